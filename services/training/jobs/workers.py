"""How a job's training runs on Ray Train workers, whichever loop it is (`lm_loop`, `hf_loop`, `ppo_loop`).

The driver calls `run_on_workers` with the loop's body; the body opens with `WorkerRun(loop_config)`
(the job's ids, its store, the artifact store, the data set and the worker's rank) and ends with
`WorkerRun.finish`, which writes, on rank 0, the run's files under `checkpoints/<run_id>/`:
`final.json` (the held-out metrics) and then `final/` (the model as a Hugging Face folder), in one
rename each, so a final folder always has its metrics. `finished` reads them back for the driver;
a run that stopped early has none.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray.train
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from libs.common.artifacts import ArtifactStore
from services.training import checkpoints
from services.training.jobs import JobContext
from services.training.jobstore import JobRecord, JobStore

MAX_WORKER_RESTARTS = 2
BEFORE = "before.json"
"""The held-out metrics of the untrained model, measured once (a resumed run keeps the first)."""


def run_on_workers(
    job: JobRecord,
    context: JobContext,
    body: Callable[[dict[str, Any]], None],
    dataset: Path,
    settings: dict[str, Any],
    num_workers: int,
    use_gpu: bool = False,
    run_id: str = "",
) -> dict[str, float] | None:
    """Run `body` on `num_workers` Ray Train workers (restarted on failure); the final metrics, or None.

    `body` gets `settings` plus the job's ids, the data set and where the store is; it reaches Redis
    through its own environment (JobStore.from_env), so no password shows in Ray's dashboard.
    """
    run_id = run_id or job.job_id
    attempt = context.store.get(job.job_id).attempts
    trainer = TorchTrainer(
        body,
        train_loop_config={
            **settings,
            "job_id": job.job_id,
            "run_id": run_id,
            "dataset": str(dataset),
            "artifacts": str(context.artifacts.root),
        },
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=RunConfig(
            name=f"{run_id.replace('/', '-')}-{attempt}",
            storage_path=context.ray_storage,
            failure_config=FailureConfig(max_failures=MAX_WORKER_RESTARTS),
        ),
    )
    trainer.fit()
    return finished(context.artifacts, run_id)


def finished(artifacts: ArtifactStore, run_id: str) -> dict[str, float] | None:
    """The metrics of a run that wrote its final model, else None."""
    if not artifacts.path(checkpoints.final_dir(run_id)).is_dir():
        return None
    metrics: dict[str, float] = json.loads(artifacts.path(f"{checkpoints.job_dir(run_id)}/final.json").read_text())
    return metrics


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write a JSON file in one rename: readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


class WorkerRun:
    """What every worker of a run starts from: the settings `run_on_workers` adds to the loop's own."""

    def __init__(self, loop_config: dict[str, Any]) -> None:
        self.job_id: str = loop_config["job_id"]
        self.run_id: str = loop_config["run_id"]
        self.store = JobStore.from_env()  # the Redis URL and its password come from the worker's environment
        self.artifacts = ArtifactStore(loop_config["artifacts"])
        self.dataset = Path(loop_config["dataset"])
        self.rank: int = ray.train.get_context().get_world_rank()

    def resumed(self, checkpoint: Path, step: int | None = None) -> None:
        """Log (once, from rank 0) where training goes on from."""
        if self.rank == 0:
            at = f" at step {step}" if step is not None else ""
            self.store.log(self.job_id, f"resumed from {self.artifacts.relative(checkpoint)}{at}")

    @property
    def before_file(self) -> Path:
        return self.artifacts.path(f"{checkpoints.job_dir(self.run_id)}/{BEFORE}")

    def measure_before(self, evaluate: Callable[[], dict[str, float]]) -> None:
        """The untrained model's held-out metrics, once per run; `evaluate` runs on every rank (collective)."""
        if self.before_file.is_file():  # the same on every rank: the store is shared
            return
        before = evaluate()
        if self.rank == 0:
            write_json(self.before_file, before)

    def with_before(self, metrics: dict[str, float]) -> dict[str, float]:
        """The metrics and, as `<name>_before`, those measured before training (when there were any)."""
        before = json.loads(self.before_file.read_text()) if self.before_file.is_file() else {}
        return {**metrics, **{f"{name}_before": value for name, value in before.items()}}

    def finish(self, metrics: dict[str, float], save: Callable[[Path], None]) -> None:
        """On rank 0: the metrics, then the model folder (`save` fills it), then a log line of the held-out figures."""
        if self.rank != 0:
            return
        write_json(self.artifacts.path(f"{checkpoints.job_dir(self.run_id)}/final.json"), metrics)
        with self.artifacts.staging(checkpoints.final_dir(self.run_id), replace=True) as folder:
            save(folder)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("eval_") or k == "perplexity")
        part = f" {self.run_id}" if self.run_id != self.job_id else ""
        self.store.log(self.job_id, f"finished{part}: {shown}")
