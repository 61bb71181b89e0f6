"""The training service's core: jobs and models as a plain Python class with no transport.

The gRPC servicer is a thin adapter over it. Submission checks everything first (job type,
config, tokeniser, corpus, memory) and only then records the job and hands it to the backend, so
a refused job leaves nothing behind. On start, `load` reconciles: jobs recorded as running whose
driver is gone are resumed from their last checkpoint, or failed once they used up
`max_attempts`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from libs.common.config import CommonConfig
from libs.common.errors import FailedPrecondition, InvalidArgument
from libs.common.rpc.pools import run_blocking
from libs.common.secrets import redis_url
from services.training.backends import BACKENDS, Backend
from services.training.config import TrainingConfig
from services.training.jobs import JobContext, job_type
from services.training.jobstore import (
    ACTIVE,
    CANCEL,
    CANCELLED,
    FAILED,
    FINAL,
    PENDING,
    RUNNING,
    STATES,
    Event,
    JobRecord,
)
from services.training.registry import ModelInfo
from services.training.runner import build_context

log = logging.getLogger(__name__)

WATCH_BLOCK_MS = 1000
MAX_LIST = 1000
MAX_TOKEN_CHARS = 256


class TrainingCore:
    def __init__(self, config: TrainingConfig, context: JobContext) -> None:
        if config.backend not in BACKENDS:
            raise InvalidArgument(
                f"unknown backend {config.backend!r}; expected one of {sorted(BACKENDS)}", field="backend"
            )
        self.config = config
        self.context = context
        self.store = context.store
        self.backend: Backend = BACKENDS[config.backend](config, context)

    @classmethod
    def from_config(cls, common: CommonConfig, config: TrainingConfig) -> TrainingCore:
        return cls(config, build_context(common, config, redis_url(common)))

    # -- lifecycle ---------------------------------------------------------------------------
    def load(self) -> None:
        self.backend.open()
        self.reconcile()

    def reconcile(self) -> list[str]:
        """Resume (or fail) the active jobs whose driver is gone; returns their ids."""
        lost = [job for job in self.store.active() if not self.backend.alive(job)]
        for job in lost:
            if job.attempts >= self.config.max_attempts:
                self.store.transition(
                    job.job_id, FAILED, reason=f"its driver was lost and it has used all {job.attempts} attempts"
                )
                continue
            if job.state == RUNNING:
                where = job.checkpoint or "the start"
                self.store.transition(job.job_id, PENDING, reason=f"its driver was lost; resuming from {where}")
            self._start(self.store.get(job.job_id))
        return [job.job_id for job in lost]

    def drain(self) -> None:
        self.backend.drain(self.config.drain_seconds)

    # -- jobs --------------------------------------------------------------------------------
    def submit(self, job_type_name: str, config: dict[str, Any], client_token: str = "") -> JobRecord:
        """Check, record and start a job; the same client_token returns the first job again."""
        self._check_sizes(config, client_token)
        checked = job_type(job_type_name).check(config, self.context)
        job, created = self.store.create(job_type_name, checked, self.config.backend, client_token)
        if created:
            self._start(job)
        return self.store.get(job.job_id)

    def _check_sizes(self, config: dict[str, Any], client_token: str) -> None:
        """Bounds every job type shares, before a type looks at the config: its size and its workers."""
        if len(client_token) > MAX_TOKEN_CHARS:
            raise InvalidArgument(f"at most {MAX_TOKEN_CHARS} characters", field="client_token")
        size = len(json.dumps(config))
        if size > self.config.max_config_bytes:
            raise InvalidArgument(f"{size} bytes as JSON; at most {self.config.max_config_bytes}", field="config")
        workers = config.get("num_workers")
        if isinstance(workers, int) and not isinstance(workers, bool) and workers > self.config.max_workers:
            raise InvalidArgument(
                f"at most {self.config.max_workers} (LLMP_TRAINING_MAX_WORKERS)", field="config.num_workers"
            )

    def _start(self, job: JobRecord) -> None:
        try:
            self.backend.start(job)
        except Exception as e:  # e.g. the Kubernetes API refused the RayJob
            log.exception("job %s could not be started", job.job_id)
            self.store.transition(job.job_id, FAILED, reason=f"the {job.backend} backend could not start it: {e}")

    def get(self, job_id: str) -> JobRecord:
        return self.store.get(job_id)

    def list_jobs(self, state: str = "", job_type_name: str = "", limit: int = 100) -> list[JobRecord]:
        if state and state not in STATES:
            raise InvalidArgument(f"expected one of {STATES}", field="state")
        return self.store.list_jobs(state, job_type_name, min(limit or 100, MAX_LIST))

    def cancel(self, job_id: str) -> JobRecord:
        """A pending job ends at once; a running one stops at its next step, after a checkpoint."""
        job = self.store.get(job_id)
        if job.state in FINAL:
            raise FailedPrecondition(f"job {job_id} has already ended ({job.state})", field="job_id")
        self.store.request_stop(job_id, CANCEL)
        if job.state == PENDING:
            # If it started meanwhile, the transition is refused and the stop request reaches its workers.
            with contextlib.suppress(FailedPrecondition):
                self.store.transition(job_id, CANCELLED, reason="cancelled before it started")
        return self.store.get(job_id)

    def resume(self, job_id: str) -> JobRecord:
        """Start a FAILED or CANCELLED job again; it continues from its last checkpoint."""
        job = self.store.get(job_id)
        if job.state in ACTIVE:
            raise FailedPrecondition(f"job {job_id} is {job.state}; only ended jobs can be resumed", field="job_id")
        self.store.transition(job_id, PENDING, reason=f"resumed from {job.checkpoint or 'the start'}")
        self._start(self.store.get(job_id))
        return self.store.get(job_id)

    async def watch(self, job_id: str) -> AsyncIterator[tuple[JobRecord, Event]]:
        """Each event of the job from its first, with the job as it stands; ends when the job does."""
        job = await run_blocking(self.store.get, job_id)
        after = "0"
        while True:
            events = await run_blocking(self.store.events, job_id, after, WATCH_BLOCK_MS)
            for event in events:
                after = event.id
                if event.kind == "progress":
                    job = replace(job, progress=event.data)
                elif event.kind == "state":
                    job = await run_blocking(self.store.get, job_id)
                    job = replace(job, state=event.data["state"], reason=event.data["reason"])
                yield job, event
                if job.state in FINAL and not await run_blocking(self.store.events, job_id, after):
                    return  # the end, unless events follow it (the job was resumed since)

    # -- models ------------------------------------------------------------------------------
    def list_models(self, prefix: str = "") -> list[ModelInfo]:
        return self.context.registry.list(prefix)

    def get_model(self, ref: str) -> ModelInfo:
        return self.context.registry.get(ref)
