"""The driver of one job: mark it running, run its type, record how it ended.

The local backend calls `run_job` in a thread of the service; the kuberay backend makes it the
entry point of a RayJob's driver, where it runs as

    python -m services.training.runner --job-id train-0123456789ab

with LLMP_REDIS_URL, LLMP_HOME and LLMP_TOKENIZER_ADDRESS pointing at the platform's Redis,
artifact store and tokeniser service, and RAY_ADDRESS at the RayJob's cluster.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence

import redis

from libs.common import config as cfg
from libs.common import logs
from libs.common.artifacts import ArtifactStore
from libs.common.clients.tokenizer import TokenizerClient
from libs.common.config import CommonConfig
from libs.common.errors import FailedPrecondition, LlmpError
from libs.common.planning import GB
from services.training.config import TrainingConfig
from services.training.jobs import DONE, JobContext, job_type
from services.training.jobstore import CANCEL, CANCELLED, FAILED, PREEMPT, RUNNING, SUCCEEDED, JobStore
from services.training.registry import ModelRegistry

log = logging.getLogger(__name__)

MAX_REASON_CHARS = 2000


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
    attempt = store.start_attempt(job_id)
    try:
        store.transition(job_id, RUNNING, reason=f"attempt {attempt}")
    except FailedPrecondition:
        log.info("job %s did not start: it is no longer pending", job_id)
        return
    job = store.get(job_id)
    try:
        outcome = job_type(job.type).run(job, context)
    except Exception as e:  # whatever a job raises ends it, with the reason on record
        if store.stop_requested(job_id) == PREEMPT:  # Ray went away under it as the service stopped
            store.log(job_id, f"interrupted by the service stopping ({type(e).__name__}); it resumes on restart")
            return
        reason = e.message if isinstance(e, LlmpError) else f"{type(e).__name__}: {e}"
        log.exception("job %s failed", job_id)
        store.transition(job_id, FAILED, reason=reason[:MAX_REASON_CHARS])
        return
    if outcome == DONE:
        store.transition(job_id, SUCCEEDED, reason="finished")
    elif outcome == CANCEL:
        checkpoint = store.get(job_id).checkpoint or "none"
        store.transition(job_id, CANCELLED, reason=f"cancelled; last checkpoint: {checkpoint}")
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
    run_job(args.job_id, build_context(common, config, common.redis_url))


if __name__ == "__main__":
    main()
