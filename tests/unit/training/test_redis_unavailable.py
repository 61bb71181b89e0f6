"""Redis going away: every store call says UNAVAILABLE (never a job state), and a driver waits for
Redis to come back instead of leaving its job stuck. A real redis-server, stopped and restarted."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import grpc
import pytest

from libs.common.artifacts import ArtifactStore
from libs.common.errors import Unavailable
from libs.common.planning import GB
from services.training import runner
from services.training.jobs import JobContext
from services.training.jobstore import FAILED, PENDING, JobStore
from tests.helpers.redis_server import RedisServer


def test_every_call_is_unavailable_while_redis_is_down(redis_server: RedisServer) -> None:
    store = JobStore.from_url(redis_server.url)
    job, _ = store.create("pretrain", {"max_steps": 1}, "local_ray")
    redis_server.stop()
    calls = {
        "create": lambda: store.create("pretrain", {}, "local_ray"),
        "get": lambda: store.get(job.job_id),
        "list_jobs": lambda: store.list_jobs(),
        "transition": lambda: store.transition(job.job_id, "RUNNING"),
        "request_stop": lambda: store.request_stop(job.job_id, "cancel"),
        "report_progress": lambda: store.report_progress(job.job_id, {"step": 1}),
        "events": lambda: store.events(job.job_id),
    }
    for name, call in calls.items():
        with pytest.raises(Unavailable, match=f"Redis is unavailable \\({name}\\)") as raised:
            call()
        assert raised.value.grpc_code == grpc.StatusCode.UNAVAILABLE
    redis_server.start()
    assert store.get(job.job_id).state == PENDING  # nothing was half-done meanwhile


class Retrying(logging.Handler):
    """Set when the driver reports that it is waiting for Redis."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "trying again" in record.getMessage():
            self.seen.set()


def test_a_driver_waits_for_redis_and_records_how_the_job_ended(redis_server: RedisServer, tmp_path: Path) -> None:
    store = JobStore.from_url(redis_server.url)
    # a type no longer known fails the moment the driver runs it: the end it must record
    job, _ = store.create("retired-type", {}, "local_ray")
    context = JobContext(
        store=store,
        registry=None,  # type: ignore[arg-type]
        artifacts=ArtifactStore(tmp_path),
        tokenizer=None,  # type: ignore[arg-type]
        redis_url=redis_server.url,
        worker_memory_bytes=GB,
        ray_storage=str(tmp_path / "ray"),
    )
    waiting = Retrying()
    logging.getLogger(runner.__name__).addHandler(waiting)
    try:
        redis_server.stop()
        driver = threading.Thread(target=runner.run_job, args=(job.job_id, context))
        driver.start()
        assert waiting.seen.wait(60), "the driver did not report waiting for Redis"
        redis_server.start()  # same port and append-only file: the job is still there
        driver.join(120)
    finally:
        logging.getLogger(runner.__name__).removeHandler(waiting)
    assert not driver.is_alive()
    ended = store.get(job.job_id)
    assert ended.state == FAILED and "unknown job type 'retired-type'" in ended.reason
    assert ended.attempts == 1


def test_the_model_registry_is_unavailable_too(redis_server: RedisServer, tmp_path: Path) -> None:
    from services.training.registry import ModelRegistry

    registry = ModelRegistry(JobStore.from_url(redis_server.url).redis, ArtifactStore(tmp_path))
    redis_server.stop()
    for call in (lambda: registry.get("tiny:latest"), lambda: registry.list()):
        with pytest.raises(Unavailable, match="Redis is unavailable"):
            call()
