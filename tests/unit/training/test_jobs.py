"""The job store against a real redis-server: idempotent submission, state transitions, restarts."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from libs.common.errors import AlreadyExists, FailedPrecondition, NotFound
from services.training.jobstore import (
    CANCEL,
    CANCELLED,
    FAILED,
    PENDING,
    RUNNING,
    SUCCEEDED,
    JobStore,
)
from tests.helpers.redis_server import RedisServer

CONFIG = {"tokenizer": "code:1", "corpus": ["stdlib"], "model_name": "tiny", "max_steps": 10}


@pytest.fixture
def store(redis_server: RedisServer) -> JobStore:
    return JobStore.from_url(redis_server.url)


def test_create_get_and_list_newest_first(store: JobStore) -> None:
    first, created = store.create("pretrain", CONFIG, "local_ray")
    second, _ = store.create("pretrain", {**CONFIG, "max_steps": 20}, "local_ray")
    assert created and first.state == PENDING and first.attempts == 0
    assert store.get(first.job_id) == first
    assert [j.job_id for j in store.list_jobs()] == [second.job_id, first.job_id]
    assert store.list_jobs(state=RUNNING) == []
    assert [j.job_id for j in store.list_jobs(limit=1)] == [second.job_id]
    with pytest.raises(NotFound, match="job_id"):
        store.get("train-missing")


def test_a_client_token_creates_one_job_even_under_concurrent_submission(store: JobStore) -> None:
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: store.create("pretrain", CONFIG, "local_ray", "tok-1"), range(16)))
    assert len({job.job_id for job, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert len(store.list_jobs()) == 1
    with pytest.raises(AlreadyExists, match="client_token"):
        store.create("pretrain", {**CONFIG, "max_steps": 99}, "local_ray", "tok-1")


def test_transitions_follow_the_lifecycle_and_are_streamed_in_order(store: JobStore) -> None:
    job, _ = store.create("pretrain", CONFIG, "local_ray")
    assert store.transition(job.job_id, RUNNING, reason="attempt 1") == PENDING
    with pytest.raises(FailedPrecondition, match="RUNNING; it cannot become RUNNING"):
        store.transition(job.job_id, RUNNING)
    store.report_progress(job.job_id, {"step": 5, "loss": 3.5})
    store.log(job.job_id, "halfway")
    store.transition(job.job_id, SUCCEEDED, reason="finished")
    with pytest.raises(FailedPrecondition):
        store.transition(job.job_id, CANCELLED)
    done = store.get(job.job_id)
    assert done.state == SUCCEEDED and done.started_at and done.finished_at and done.progress["step"] == 5
    events = store.events(job.job_id)
    assert [(e.kind, e.data) for e in events] == [
        ("state", {"state": PENDING, "reason": "submitted"}),
        ("state", {"state": RUNNING, "reason": "attempt 1"}),
        ("progress", {"step": 5, "loss": 3.5}),
        ("log", "halfway"),
        ("state", {"state": SUCCEEDED, "reason": "finished"}),
    ]
    assert store.events(job.job_id, after=events[2].id)[0].data == "halfway"
    with pytest.raises(NotFound):
        store.transition("train-missing", RUNNING)


def test_a_stop_request_is_cleared_when_a_job_is_resumed(store: JobStore) -> None:
    job, _ = store.create("pretrain", CONFIG, "local_ray")
    store.transition(job.job_id, RUNNING)
    store.request_stop(job.job_id, CANCEL)
    assert store.stop_requested(job.job_id) == CANCEL
    store.transition(job.job_id, CANCELLED)
    store.transition(job.job_id, PENDING, reason="resumed")
    assert store.stop_requested(job.job_id) == ""
    assert store.start_attempt(job.job_id) == 1 and store.start_attempt(job.job_id) == 2


def test_state_survives_a_redis_restart(store: JobStore, redis_server: RedisServer) -> None:
    job, _ = store.create("pretrain", CONFIG, "local_ray", "tok-restart")
    store.transition(job.job_id, RUNNING)
    store.update(job.job_id, checkpoint="checkpoints/x/step-00000010", metrics={"eval_loss": 2.5})
    store.report_progress(job.job_id, {"step": 10})
    redis_server.restart()
    again = JobStore.from_url(redis_server.url)
    kept = again.get(job.job_id)
    assert (kept.state, kept.checkpoint, kept.metrics, kept.progress) == (
        RUNNING,
        "checkpoints/x/step-00000010",
        {"eval_loss": 2.5},
        {"step": 10},
    )
    assert again.create("pretrain", CONFIG, "local_ray", "tok-restart") == (kept, False)
    assert [j.job_id for j in again.active()] == [job.job_id]
    again.transition(job.job_id, FAILED, reason="lost")
    assert again.active() == []
