"""Background training jobs, each in its own process so that it can be cancelled at any moment.

The Hugging Face trainer runs in Rust without a way to stop it, so a job is a spawned process:
cancelling or draining terminates it, and since the tokeniser is moved into the store only after
the process has finished, nothing half-trained is ever visible. A job holds its tokeniser
name's lock from submission to the end, so one name is never trained twice at once.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import shutil
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from libs.common.artifacts import FileLock
from libs.common.errors import NotFound, ResourceExhausted
from services.tokenizer.store import TokenizerStore

log = logging.getLogger(__name__)

PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED = "PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"
FINAL = {SUCCEEDED, FAILED, CANCELLED}


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    name: str
    state: str = PENDING
    progress: float = 0.0
    phase: str = "queued"
    tokenizer: str = ""
    error: str = ""
    elapsed_seconds: float = 0.0
    corpus_bytes: int = 0


@dataclass
class TrainJob:
    """What a job needs: the algorithm spec, the corpus files, where to work, what to record."""

    status: JobStatus
    spec: dict[str, Any]
    files: list[str]
    workdir: Path
    meta: dict[str, Any]
    chat_template: str
    lock: FileLock
    started: float = field(default_factory=time.monotonic)
    process: Any = None
    cancelled: bool = False
    changed: threading.Condition = field(default_factory=threading.Condition)
    event: asyncio.Event | None = None


def _train_in_process(spec: dict[str, Any], files: list[str], out: str, conn: Connection) -> None:
    """Child process: build the pipeline from the spec, train, save tokenizer.json to `out`."""
    from services.tokenizer.algorithms import ALGORITHMS

    try:
        algorithm = ALGORITHMS.create(spec)
        tokenizer = algorithm.pipeline()
        conn.send(("phase", "training", 0.2))
        tokenizer.train(files, algorithm.trainer())
        conn.send(("phase", "finishing", 0.9))
        algorithm.finish(tokenizer)
        tokenizer.save(out)
        conn.send(("done", "", 1.0))
    except Exception as e:  # reported to the parent, which fails the job with the message
        conn.send(("error", f"{type(e).__name__}: {e}", 0.0))


class TrainingJobs:
    def __init__(self, tokenizers: TokenizerStore, max_running: int = 2, max_pending: int = 16) -> None:
        self.tokenizers = tokenizers
        self.max_running = max_running
        self.max_pending = max_pending
        self._jobs: dict[str, TrainJob] = {}
        self._slots = threading.Semaphore(max_running)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._context = multiprocessing.get_context("spawn")

    def submit(
        self,
        name: str,
        spec: dict[str, Any],
        files: list[Path],
        texts: list[str],
        meta: dict[str, Any],
        chat_template: str,
    ) -> JobStatus:
        """Queue a job; the name's lock must be free (AlreadyExists otherwise)."""
        waiting = sum(1 for j in self._jobs.values() if j.status.state == PENDING)
        if waiting >= self.max_pending:
            raise ResourceExhausted(f"{waiting} training jobs are already waiting", retry_after=10)
        lock = self.tokenizers.store.lock(f"tokenizers-{name}-training").acquire()
        job_id = f"tok-{uuid.uuid4().hex[:12]}"
        workdir = self.tokenizers.store.root / ".staging" / job_id
        workdir.mkdir()
        all_files = [str(p) for p in files]
        if texts:  # inline text joins the corpus as one more file
            (workdir / "texts.txt").write_text("\n".join(texts), encoding="utf-8")
            all_files.append(str(workdir / "texts.txt"))
        job = TrainJob(
            JobStatus(job_id, name, corpus_bytes=meta.get("corpus_bytes", 0)),
            spec,
            all_files,
            workdir,
            meta,
            chat_template,
            lock,
        )
        try:
            self._loop = asyncio.get_running_loop()
            job.event = asyncio.Event()
        except RuntimeError:
            pass
        self._jobs[job_id] = job
        threading.Thread(target=self._run, args=(job,), name=job_id, daemon=True).start()
        return job.status

    # -- the job's life ----------------------------------------------------------------------
    def _update(self, job: TrainJob, **changes: Any) -> None:
        with job.changed:
            job.status = replace(job.status, elapsed_seconds=time.monotonic() - job.started, **changes)
            job.changed.notify_all()
        if self._loop is not None and job.event is not None:
            self._loop.call_soon_threadsafe(self._wake, job)

    @staticmethod
    def _wake(job: TrainJob) -> None:
        if job.event is not None:
            job.event.set()
            job.event = asyncio.Event()

    def _run(self, job: TrainJob) -> None:
        """The job's thread: wait for a slot, train, then release the name before saying it ended."""
        final: dict[str, Any] = {}
        try:
            while not self._slots.acquire(timeout=0.2):
                if job.cancelled:
                    break
            else:
                try:
                    if not job.cancelled:
                        self._update(job, state=RUNNING, phase="starting", progress=0.05)
                        final = self._train(job)
                finally:
                    self._slots.release()
        except Exception as e:
            log.exception("training job %s failed", job.status.job_id)
            final = {"state": FAILED, "phase": "failed", "error": str(e)}
        finally:
            job.lock.release()
            shutil.rmtree(job.workdir, ignore_errors=True)
        if job.cancelled:
            final = {"state": CANCELLED, "phase": "cancelled"}
        self._update(job, **final)

    def _train(self, job: TrainJob) -> dict[str, Any]:
        """Run the training process; returns the job's final status fields."""
        out = job.workdir / "tokenizer.json"
        parent, child = self._context.Pipe(duplex=False)
        job.process = self._context.Process(
            target=_train_in_process,
            args=(job.spec, job.files, str(out), child),
            name=f"train-{job.status.job_id}",
            daemon=True,
        )
        job.process.start()
        child.close()
        outcome, message = "error", "the training process ended without a result"
        while True:
            if parent.poll(0.2):
                try:
                    kind, text, progress = parent.recv()
                except EOFError:
                    break
                if kind == "phase":
                    self._update(job, phase=text, progress=progress)
                    continue
                outcome, message = kind, text
                break
            if not job.process.is_alive():
                break
        job.process.join()
        if job.cancelled:
            return {}
        if outcome != "done":
            return {"state": FAILED, "phase": "failed", "error": message}
        self._update(job, phase="saving", progress=0.95)
        meta = {**job.meta, "training_seconds": round(time.monotonic() - job.started, 3)}
        info = self.tokenizers.save(job.status.name, Tokenizer.from_file(str(out)), meta, job.chat_template)
        log.info("trained %s in %.1fs", info.ref, meta["training_seconds"])
        return {"state": SUCCEEDED, "phase": "done", "progress": 1.0, "tokenizer": info.ref}

    # -- queries -----------------------------------------------------------------------------
    def get(self, job_id: str) -> JobStatus:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no training job {job_id!r}", field="job_id")
        return replace(
            job.status,
            elapsed_seconds=job.status.elapsed_seconds if job.status.state in FINAL else time.monotonic() - job.started,
        )

    def cancel(self, job_id: str) -> JobStatus:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no training job {job_id!r}", field="job_id")
        if job.status.state not in FINAL:
            job.cancelled = True
            if job.process is not None and job.process.is_alive():
                job.process.terminate()
        return self.wait(job_id, timeout=10)

    def wait(self, job_id: str, timeout: float | None = None) -> JobStatus:
        """Block until the job ends (or the timeout passes); for callers outside an event loop."""
        job = self._jobs[job_id]
        with job.changed:
            job.changed.wait_for(lambda: job.status.state in FINAL, timeout)
        return self.get(job_id)

    async def watch(self, job_id: str) -> AsyncIterator[JobStatus]:
        """Yield the status whenever it changes, ending with the final one."""
        self.get(job_id)
        job = self._jobs[job_id]
        last = None
        while True:
            event = job.event
            status = job.status
            if status != last:
                yield self.get(job_id)
                last = status
            if status.state in FINAL:
                return
            if event is None:
                await asyncio.sleep(0.2)
            else:
                await event.wait()

    def running(self) -> list[str]:
        return [j.status.job_id for j in self._jobs.values() if j.status.state not in FINAL]

    async def drain(self, timeout: float) -> None:
        """Let running jobs finish within `timeout`, then cancel whatever is left."""
        end = time.monotonic() + timeout
        for job_id in self.running():
            left = max(0.0, end - time.monotonic())
            await asyncio.to_thread(self.wait, job_id, left)
        for job_id in self.running():
            log.warning("cancelling training job %s at shutdown", job_id)
            await asyncio.to_thread(self.cancel, job_id)
