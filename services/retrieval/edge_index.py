"""A Qdrant Edge shard that keeps serving while its HNSW index is built: `LiveShard`.

Qdrant Edge builds indexes only when asked (`EdgeShard.optimize()`), and that call holds
Python's GIL until it returns (minutes for 100k vectors), which would stall every thread of
the service. So the build runs in a child process, on a copy:

1. with writes paused, the shard is flushed and its folder copied to `build/`; from now on
   every update is also kept in memory (the op log);
2. a child process (`python -m services.retrieval.edge_index build/`) opens the copy and runs
   the engine's optimizers: HNSW graphs, quantised vectors, payload indexes;
3. with writes paused again, the op log is replayed onto the built copy, which then replaces
   the serving shard (`shard/` -> `old/`, `build/` -> `shard/`, reopen).

Searches never wait for step 2; new points are searchable as soon as `update` returns (exactly,
from the engine's plain appendable segment) and use the graph once the swap is done. A crash
at any step leaves a folder `recover()` settles: `build/` is dropped (the op log died with the
process, but `shard/` or `old/` has every write), and an `old/` without a `shard/` is put back.
A build starts when the vectors written since the last one reach `threshold_kb` (the engine's
indexing threshold: smaller collections are searched exactly and never built).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import qdrant_edge as qe

log = logging.getLogger(__name__)
T = TypeVar("T")

SHARD, BUILD, OLD = "shard", "build", "old"
INDEXED = "indexed"  # marker file: no vector was written since the last completed build
FLUSH_EVERY_S = 5.0  # segments flushed at most this often by writers, as Qdrant's server does in the background


def recover(folder: Path) -> None:
    """Settle a build or swap that a crash interrupted (see the module docstring)."""
    if not (folder / SHARD).exists() and (folder / OLD).exists():
        os.rename(folder / OLD, folder / SHARD)
    for leftover in (BUILD, OLD):
        shutil.rmtree(folder / leftover, ignore_errors=True)


def _die_with_parent() -> None:
    """In the child: be killed when the thread that started it dies (Linux), so no orphan keeps building."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class LiveShard:
    """One collection's shard: reads and writes in-process, index builds in a child process."""

    def __init__(self, folder: Path, threshold_kb: float, vector_kb: float, build: bool = True) -> None:
        recover(folder)
        self.folder = folder
        self.threshold_kb = threshold_kb
        self.vector_kb = vector_kb  # KiB one point's vectors take (dense float32 + a sparse allowance)
        self.build_enabled = build
        self.lock = threading.RLock()  # every call into `shard`, and the swap
        self.write_lock = threading.Lock()  # writers, the snapshot copy and the replay (taken before `lock`)
        self.shard = qe.EdgeShard.load(str(folder / SHARD))
        self._oplog: list[qe.UpdateOperation] | None = None  # updates since the snapshot, while building
        self._thread: threading.Thread | None = None
        self._child: subprocess.Popen[bytes] | None = None
        self._closed = self._failed = False
        self.builds = 0  # completed builds, for tests and benchmarks
        self.swap_pauses_ms: list[float] = []  # how long each swap kept searches waiting, for benchmarks
        self._flushed = time.monotonic()
        indexed = (folder / INDEXED).exists()
        self.pending_kb = 0.0 if indexed else self.read(lambda s: s.info().points_count) * vector_kb
        self.maybe_build()

    def read(self, call: Callable[[qe.EdgeShard], T]) -> T:
        with self.lock:
            return call(self.shard)

    def update(self, operation: qe.UpdateOperation, points: int = 0) -> None:
        """Apply one update; `points` is how many points it wrote vectors for (they count towards a build)."""
        with self.write_lock:
            with self.lock:
                self.shard.update(operation)
                if time.monotonic() - self._flushed > FLUSH_EVERY_S:
                    self.shard.flush()  # so the log is truncated and a restart replays little
                    self._flushed = time.monotonic()
            if self._oplog is not None:
                self._oplog.append(operation)
            if points:
                self.pending_kb += points * self.vector_kb
                (self.folder / INDEXED).unlink(missing_ok=True)
        if points:
            self.maybe_build()

    def maybe_build(self) -> None:
        with self.write_lock:
            thread = self._thread
            busy = thread is not None and thread.is_alive() and thread is not threading.current_thread()
            if busy or self._closed or self._failed or not self.build_enabled or self.pending_kb < self.threshold_kb:
                return
            self._thread = threading.Thread(target=self._build, name=f"index-{self.folder.name}", daemon=True)
            self._thread.start()

    def wait_built(self) -> None:
        """Block until no build is running or due (for benchmarks and tests; serving never waits)."""
        while (thread := self._thread) is not None and thread.is_alive():
            thread.join()

    def _build(self) -> None:
        with self.write_lock:
            with self.lock:
                self.shard.flush()
            shutil.rmtree(self.folder / BUILD, ignore_errors=True)
            shutil.copytree(self.folder / SHARD, self.folder / BUILD)
            self._oplog, started_kb, self.pending_kb = [], self.pending_kb, 0.0
        built = self._optimize(self.folder / BUILD)
        with self.write_lock:
            replay, self._oplog = self._oplog or [], None
            if not built or self._closed:
                shutil.rmtree(self.folder / BUILD, ignore_errors=True)
                self.pending_kb += started_kb
                self._failed = not self._closed
                return
            self._swap(replay)
        self.maybe_build()  # writes during the build may have reached the threshold again

    def _optimize(self, folder: Path) -> bool:
        try:
            self._child = subprocess.Popen(
                [sys.executable, "-m", __name__, str(folder)], preexec_fn=_die_with_parent, stderr=subprocess.PIPE
            )
            _, errors = self._child.communicate()
        except OSError as e:
            log.error("could not start an index build for %s: %s", self.folder.name, e)
            return False
        if self._child.returncode != 0 and not self._closed:
            log.error("index build for %s failed (%s): %s", self.folder.name, self._child.returncode, errors.decode())
        return self._child.returncode == 0

    def _swap(self, replay: list[qe.UpdateOperation]) -> None:
        """Replay the op log onto the built copy and serve it (the caller holds the write lock)."""
        fresh = qe.EdgeShard.load(str(self.folder / BUILD))
        for operation in replay:
            fresh.update(operation)
        fresh.flush()
        fresh.close()
        with self.lock:
            paused = time.perf_counter()
            self.shard.close()
            os.rename(self.folder / SHARD, self.folder / OLD)
            os.rename(self.folder / BUILD, self.folder / SHARD)
            self.shard = qe.EdgeShard.load(str(self.folder / SHARD))
            self.swap_pauses_ms.append((time.perf_counter() - paused) * 1000)
        shutil.rmtree(self.folder / OLD, ignore_errors=True)
        if self.pending_kb == 0:
            (self.folder / INDEXED).touch()
        self.builds += 1
        log.info("index of %s built; %d updates replayed", self.folder.name, len(replay))

    def close(self) -> None:
        """Stop a running build (its copy is dropped) and release the shard."""
        with self.write_lock:
            self._closed = True
        if self._child is not None and self._child.poll() is None:
            self._child.kill()
        if self._thread is not None:
            self._thread.join()
        with self.lock:
            self.shard.close()


def main(argv: list[str] | None = None) -> Any:
    """The child: open the copied shard, run the engine's optimizers to the end, flush and close."""
    folder = (argv or sys.argv[1:])[0]
    shard = qe.EdgeShard.load(folder)
    shard.optimize()
    shard.flush()
    shard.close()


if __name__ == "__main__":
    main()
