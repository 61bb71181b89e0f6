"""Training jobs as the main job runs them: submitted with an idempotency key of the run (a rerun
attaches to the same job, and resumes it from its checkpoint if it had failed), followed on the
stage's progress bar, and kept as a loss curve.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmp.training.v1 import training_pb2 as pb

from libs.common.clients.training import TrainingClient
from libs.common.demo.runner import StageContext, StageError

RESUMABLE = (pb.Job.FAILED, pb.Job.CANCELLED)


@dataclass
class JobResult:
    job_id: str
    model: str
    """Registered model ("name:version"), "" for a prepare job."""
    dataset: str
    metrics: dict[str, float]
    curve: list[tuple[int, float]] = field(default_factory=list)
    """(step, training loss) as the job reported them."""
    seconds: float = 0.0
    tokens_per_second: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "model": self.model,
            "dataset": self.dataset,
            "metrics": self.metrics,
            "curve": [list(p) for p in self.curve],
            "seconds": self.seconds,
            "tokens_per_second": self.tokens_per_second,
        }


def run_job(
    ctx: StageContext, job_type: str, config: dict[str, Any], key: str, offset: float = 0.0, label: str = ""
) -> JobResult:
    """Submit (or find again) and follow a job to its end; the stage's bar shows `offset` + its step."""
    client = TrainingClient()
    try:
        job = client.submit(job_type, config, client_token=ctx.token(key))
        if job.state in RESUMABLE:
            ctx.say(f"{job_type} job {job.job_id} had {pb.Job.State.Name(job.state).lower()}; resuming it")
            job = client.resume(job.job_id)
        curve: dict[int, float] = {}
        speed = 0.0
        final = job
        label = label or job_type
        for event in client.watch(job.job_id):
            final = event.job
            if event.HasField("progress") and event.progress.total_steps:
                p = event.progress
                curve[int(p.step)] = float(p.loss)
                speed = p.tokens_per_second or speed
                ctx.at(offset + p.step, f"{label} step {p.step}/{p.total_steps} loss {p.loss:.3f}")
        final = client.get(job.job_id)
    finally:
        client.close()
    if final.state != pb.Job.SUCCEEDED:
        state = pb.Job.State.Name(final.state).lower()
        raise StageError(
            f"{job_type} job {job.job_id} ended {state}: {final.reason or 'no reason'}",
            f"`llmp train get {job.job_id}` shows it; `llmp demo` resumes it from its last checkpoint",
        )
    return JobResult(
        job_id=final.job_id,
        model=final.model,
        dataset=final.dataset,
        metrics=dict(final.metrics),
        curve=sorted(curve.items()),
        seconds=_seconds(final),
        tokens_per_second=speed,
    )


def _seconds(job: pb.Job) -> float:
    from datetime import datetime

    if not job.started_at or not job.finished_at:
        return 0.0
    parse = datetime.fromisoformat
    return (
        parse(job.finished_at.replace("Z", "+00:00")) - parse(job.started_at.replace("Z", "+00:00"))
    ).total_seconds()
