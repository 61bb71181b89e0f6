"""The training core's lifecycle rules against a real Redis, with a backend that only records starts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from libs.common.config import CommonConfig
from libs.common.errors import FailedPrecondition, InvalidArgument
from services.training.backends import Backend
from services.training.config import TrainingConfig
from services.training.core import TrainingCore
from services.training.jobstore import CANCELLED, FAILED, PENDING, RUNNING, SUCCEEDED, JobRecord
from tests.helpers.redis_server import RedisServer


class RecordingBackend(Backend):
    """Starts nothing: remembers which jobs it was asked to start; none survives a restart."""

    def __init__(self) -> None:
        self.started: list[str] = []

    def open(self) -> None: ...

    def start(self, job: JobRecord) -> None:
        self.started.append(job.job_id)

    def alive(self, job: JobRecord) -> bool:
        return False

    def drain(self, timeout: float) -> None: ...


@pytest.fixture
def core(redis_server: RedisServer, tmp_path: Path) -> TrainingCore:
    common = CommonConfig(home=str(tmp_path), redis_url=redis_server.url)
    core = TrainingCore.from_config(common, TrainingConfig(max_attempts=3))
    core.backend = RecordingBackend()
    return core


def _job(core: TrainingCore, state: str, attempts: int = 0, checkpoint: str = "") -> str:
    job, _ = core.store.create("pretrain", {"max_steps": 10}, "local_ray")
    for _ in range(attempts):
        core.store.start_attempt(job.job_id)
    core.store.update(job.job_id, checkpoint=checkpoint)
    if state != PENDING:
        core.store.transition(job.job_id, RUNNING)
    if state not in (PENDING, RUNNING):
        core.store.transition(job.job_id, state)
    return job.job_id


def test_reconcile_resumes_lost_jobs_and_fails_those_out_of_attempts(core: TrainingCore) -> None:
    lost = _job(core, RUNNING, attempts=1, checkpoint="checkpoints/a/step-00000010")
    queued = _job(core, PENDING)
    exhausted = _job(core, RUNNING, attempts=3)
    done = _job(core, SUCCEEDED, attempts=1)
    assert sorted(core.reconcile()) == sorted([lost, queued, exhausted])
    assert sorted(core.backend.started) == sorted([lost, queued])  # type: ignore[attr-defined]
    assert core.get(lost).state == PENDING
    assert core.get(lost).reason == "its driver was lost; resuming from checkpoints/a/step-00000010"
    assert core.get(exhausted).state == FAILED and "all 3 attempts" in core.get(exhausted).reason
    assert core.get(done).state == SUCCEEDED


def test_cancel_and_resume_follow_the_lifecycle(core: TrainingCore) -> None:
    queued = _job(core, PENDING)
    assert core.cancel(queued).state == CANCELLED
    with pytest.raises(FailedPrecondition, match="already ended"):
        core.cancel(queued)
    running = _job(core, RUNNING)
    assert core.cancel(running).stop == "cancel" and core.get(running).state == RUNNING  # stops at its next step
    with pytest.raises(FailedPrecondition, match="only ended jobs"):
        core.resume(running)
    resumed = core.resume(queued)
    assert (resumed.state, resumed.stop) == (PENDING, "")
    assert core.backend.started == [queued]  # type: ignore[attr-defined]
    assert [j.job_id for j in core.list_jobs(state=PENDING)] == [queued]


def test_watch_streams_every_event_and_outlives_an_end_that_was_resumed(core: TrainingCore) -> None:
    job_id = _job(core, RUNNING)
    core.store.transition(job_id, FAILED, reason="lost")
    core.store.transition(job_id, PENDING, reason="resumed")
    core.store.transition(job_id, RUNNING)
    core.store.report_progress(job_id, {"step": 3, "loss": 2.0})
    core.store.log(job_id, "almost there")
    core.store.transition(job_id, SUCCEEDED, reason="finished")

    async def collect() -> list[tuple[str, str, object]]:
        return [(job.state, event.kind, event.data) async for job, event in core.watch(job_id)]

    seen = asyncio.run(collect())
    assert [state for state, kind, _ in seen if kind == "state"] == [
        PENDING,
        RUNNING,
        FAILED,
        PENDING,
        RUNNING,
        SUCCEEDED,
    ]
    assert (RUNNING, "progress", {"step": 3, "loss": 2.0}) in seen and (RUNNING, "log", "almost there") in seen
    assert seen[-1][0] == SUCCEEDED


def test_a_refused_submission_records_nothing(core: TrainingCore) -> None:
    with pytest.raises(InvalidArgument) as refused:
        core.submit("pretrain", {"tokenizer": "t", "model_name": "m"})
    assert refused.value.field == "config.corpus"
    assert core.list_jobs() == [] and core.backend.started == []  # type: ignore[attr-defined]


def test_sizes_every_job_shares_are_capped(core: TrainingCore) -> None:
    core.config.max_workers = 4
    for config, token, field in (
        ({"num_workers": 5}, "", "config.num_workers"),
        ({"notes": "x" * (core.config.max_config_bytes + 1)}, "", "config"),
        ({}, "t" * 257, "client_token"),
    ):
        with pytest.raises(InvalidArgument) as e:
            core.submit("pretrain", config, token)
        assert e.value.field == field
    assert core.list_jobs() == [], "nothing was recorded"
