"""The driver of one job: mark it running, run its type, record how it ended.

The local backend calls `run_job` in a thread of the service; the kuberay backend makes it the
entry point of a RayJob's driver, where it runs as

    python -m services.training.runner --job-id train-0123456789ab

with LLMP_REDIS_URL, LLMP_HOME and LLMP_TOKENIZER_ADDRESS pointing at the platform's Redis,
artifact store and tokeniser service, and RAY_ADDRESS at the RayJob's cluster.

Redis going away never strands a job: the driver waits for it (with backoff, up to
REDIS_PATIENCE_S) to record each change of state, so a job whose run failed because Redis was
down ends FAILED with that reason once Redis is back, and can be resumed.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import redis

from libs.common import config as cfg
from libs.common import logs
from libs.common.artifacts import ArtifactStore
from libs.common.clients.tokenizer import TokenizerClient
from libs.common.config import CommonConfig
from libs.common.errors import FailedPrecondition, LlmpError, Unavailable
from libs.common.planning import GB
from libs.common.secrets import redis_url
from services.training.config import TrainingConfig
from services.training.jobs import DONE, JobContext, job_type
from services.training.jobstore import CANCEL, CANCELLED, FAILED, PREEMPT, RUNNING, SUCCEEDED, JobStore
from services.training.registry import ModelRegistry

log = logging.getLogger(__name__)

MAX_REASON_CHARS = 2000
REDIS_PATIENCE_S = 600.0
"""How long a driver keeps trying to reach Redis before it gives up (the job is then resumed on
the service's next start, as any job whose driver was lost)."""

T = TypeVar("T")


def patiently(call: Callable[[], T], what: str, patience: float = REDIS_PATIENCE_S) -> T:
    """`call()`, tried again with backoff (0.2 s doubling to 5 s) while Redis is unavailable."""
    end, delay = time.monotonic() + patience, 0.2
    while True:
        try:
            return call()
        except Unavailable as e:
            if time.monotonic() + delay > end:
                raise
            log.warning("%s: %s; trying again in %.1f s", what, e.message, delay)
            time.sleep(delay)
            delay = min(2 * delay, 5.0)


def record(store: JobStore, job_id: str, to: str, reason: str) -> None:
    """Move the job to `to`, waiting for Redis if need be; a retry that finds it done already is fine."""
    try:
        patiently(lambda: store.transition(job_id, to, reason=reason), f"job {job_id} -> {to}")
    except FailedPrecondition:
        if store.get(job_id).state != to:  # not an earlier try of ours whose reply was lost
            raise


def build_context(common: CommonConfig, config: TrainingConfig, redis_url: str) -> JobContext:
    client = redis.Redis.from_url(redis_url, decode_responses=True, health_check_interval=30)
    artifacts = ArtifactStore(common.artifacts_path)
    return JobContext(
        store=JobStore(client),
        registry=ModelRegistry(client, artifacts),
        artifacts=artifacts,
        tokenizer=TokenizerClient(),
        redis_url=redis_url,
        worker_memory_bytes=int(config.worker_memory_gb * GB),
        ray_storage=str(common.home_path / "ray"),
        worker_gpus=config.worker_gpus,
    )


def run_job(job_id: str, context: JobContext) -> None:
    """Run a PENDING job to its end; a job cancelled before it starts is left as it is."""
    store = context.store
    attempt = patiently(lambda: store.start_attempt(job_id), f"job {job_id}: counting its start")
    try:
        record(store, job_id, RUNNING, f"attempt {attempt}")
    except FailedPrecondition:
        log.info("job %s did not start: it is no longer pending", job_id)
        return
    job = patiently(lambda: store.get(job_id), f"job {job_id}: reading it")
    try:
        outcome = job_type(job.type).run(job, context)
    except Exception as e:  # whatever a job raises ends it, with the reason on record
        stop = patiently(lambda: store.stop_requested(job_id), f"job {job_id}: reading its stop request")
        if stop == PREEMPT:  # Ray went away under it as the service stopped
            store.log(job_id, f"interrupted by the service stopping ({type(e).__name__}); it resumes on restart")
            return
        reason = e.message if isinstance(e, LlmpError) else f"{type(e).__name__}: {e}"
        log.exception("job %s failed", job_id)
        record(store, job_id, FAILED, reason[:MAX_REASON_CHARS])
        return
    if outcome == DONE:
        record(store, job_id, SUCCEEDED, "finished")
    elif outcome == CANCEL:
        checkpoint = patiently(lambda: store.get(job_id), f"job {job_id}: reading it").checkpoint or "none"
        record(store, job_id, CANCELLED, f"cancelled; last checkpoint: {checkpoint}")
    else:
        store.log(job_id, "stopped because the service is shutting down; it resumes when the service restarts")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.training.runner", description=__doc__)
    parser.add_argument("--job-id", required=True)
    args = parser.parse_args(argv)
    common = cfg.load(CommonConfig, "common")
    config = cfg.load(TrainingConfig, "training")
    logs.setup("training-runner", common.log_level, common.log_format)
    import ray

    ray.init(address=os.environ.get("RAY_ADDRESS") or "auto")
    run_job(args.job_id, build_context(common, config, redis_url(common)))


if __name__ == "__main__":
    main()
