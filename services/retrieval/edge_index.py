"""A Qdrant Edge shard that keeps serving while its HNSW index is built: `LiveShard`.

Qdrant Edge builds indexes only when asked (`EdgeShard.optimize()`), and that call holds
Python's GIL until it returns (minutes for 100k vectors), which would stall every thread of
the service. So the build runs in a child process, on a copy. Each copy is a new version of
the shard, in a folder of its own:

    <collection>/shard/        version 0: the shard as created (and as older stores hold it)
    <collection>/shard-<n>/    version n, made by the n-th build
    <collection>/current       the name of the version being served (absent: `shard`)

1. with writes paused, the serving shard is flushed and its folder copied to the next version;
   from now on every update is also kept in memory (the op log);
2. a child process (`python -m services.retrieval.edge_index shard-<n>/`) opens the copy and
   runs the engine's optimizers: HNSW graphs, quantised vectors, payload indexes;
3. the built copy is opened in this process and the op log replayed onto it while searches and
   writes go on; with writes paused, the last updates are replayed and the copy flushed;
4. `current` is replaced (written to a temporary file, fsynced, renamed over, folder fsynced):
   this is the commit. Searches wait only while the served shard is switched to the open copy;
   the old version is then closed and its folder removed.

Searches never wait for steps 2 and 3; new points are searchable as soon as `update` returns
(exactly, from the engine's plain appendable segment) and use the graph once the switch is done.
A crash at any step leaves one version that holds every acknowledged write: the one `current`
names. Before the commit that is the old version (the op log died with the process, but each
update reached the old version's write-ahead log before it returned); after it, the new one,
which had every earlier write replayed and flushed before the commit. `recover()` removes every
other version and a stray temporary pointer. It also settles the `build/` and `old/` folders
that the earlier layout (rename `shard/` -> `old/`, `build/` -> `shard/`) left on a crash.
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
from typing import Any, TypeVar, cast

import qdrant_edge as qe

log = logging.getLogger(__name__)
T = TypeVar("T")

SHARD = "shard"  # version 0; version n is `shard-<n>`
CURRENT = "current"  # pointer file: the name of the version being served
BUILD, OLD = "build", "old"  # the earlier layout's copy being built and shard being replaced
INDEXED = "indexed"  # marker file: no vector was written since the last completed build
FLUSH_EVERY_S = 5.0  # segments flushed at most this often by writers, as Qdrant's server does in the background


def version_name(number: int) -> str:
    return SHARD if number == 0 else f"{SHARD}-{number}"


def version_number(name: str) -> int | None:
    """The version a folder name holds, or None for a name that is not a version."""
    if name == SHARD:
        return 0
    prefix, _, number = name.partition("-")
    return int(number) if prefix == SHARD and number.isdigit() and number == str(int(number)) else None


def serving(folder: Path) -> str:
    """The name of the version `current` points at (`shard` where there is no pointer)."""
    pointer = folder / CURRENT
    return pointer.read_text().strip() if pointer.exists() else SHARD


def point_at(folder: Path, name: str) -> None:
    """Make `name` the served version, atomically and durably (the commit of a swap)."""
    temporary = folder / f"{CURRENT}.tmp"
    with open(temporary, "w") as f:
        f.write(name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, folder / CURRENT)
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)  # the rename itself survives a power cut
    finally:
        os.close(descriptor)


def recover(folder: Path) -> str:
    """Settle a build or swap that a crash interrupted (see the module docstring); the served version's name."""
    if not (folder / SHARD).exists() and (folder / OLD).exists() and not (folder / CURRENT).exists():
        os.rename(folder / OLD, folder / SHARD)  # the earlier layout, killed between its two renames
    for leftover in (BUILD, OLD, f"{CURRENT}.tmp"):
        path = folder / leftover
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    name = serving(folder)
    if version_number(name) is None or not (folder / name).is_dir():
        raise FileNotFoundError(f"{folder / CURRENT} names {name!r}, which is not a shard version here")
    for path in folder.iterdir():
        if path.name != name and version_number(path.name) is not None:
            shutil.rmtree(path, ignore_errors=True)  # a build cut short, or a replaced version not yet removed
    return name


def _die_with_parent() -> None:
    """In the child: be killed when the thread that started it dies (Linux), so no orphan keeps building."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class LiveShard:
    """One collection's shard: reads and writes in-process, index builds in a child process."""

    def __init__(self, folder: Path, threshold_kb: float, vector_kb: float, build: bool = True) -> None:
        self.version = recover(folder)  # the served version's folder name
        self.folder = folder
        self.threshold_kb = threshold_kb
        self.vector_kb = vector_kb  # KiB one point's vectors take (dense float32 + a sparse allowance)
        self.build_enabled = build
        self.lock = threading.RLock()  # every call into `shard`, and the swap
        self.write_lock = threading.Lock()  # writers, the snapshot copy and the replay (taken before `lock`)
        self.shard = qe.EdgeShard.load(str(folder / self.version))
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
        target = version_name(cast(int, version_number(self.version)) + 1)  # recover() checked it is a version
        with self.write_lock:
            with self.lock:
                self.shard.flush()
            shutil.rmtree(self.folder / target, ignore_errors=True)
            shutil.copytree(self.folder / self.version, self.folder / target)
            self._oplog, started_kb, self.pending_kb = [], self.pending_kb, 0.0
        if not (self._optimize(self.folder / target) and self._swap(target)):
            with self.write_lock:
                self._oplog = None
                shutil.rmtree(self.folder / target, ignore_errors=True)
                self.pending_kb += started_kb
                self._failed = not self._closed
            return
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

    def _swap(self, name: str) -> bool:
        """Open the built copy, replay the op log onto it and serve it; False if the shard was closed meanwhile."""
        fresh = qe.EdgeShard.load(str(self.folder / name))
        replayed = self._replay(fresh, 0)  # most of the log, while searches and writes go on
        with self.write_lock:
            if self._closed:
                fresh.close()
                return False
            replayed = self._replay(fresh, replayed)
            self._oplog = None
            fresh.flush()
            point_at(self.folder, name)  # the commit: a restart now opens `name`
            with self.lock:
                paused = time.perf_counter()
                old, old_name, self.shard, self.version = self.shard, self.version, fresh, name
                self.swap_pauses_ms.append((time.perf_counter() - paused) * 1000)
            if self.pending_kb == 0:
                (self.folder / INDEXED).touch()
        old.close()  # no call can reach it any more: every call takes `lock` and finds `fresh`
        shutil.rmtree(self.folder / old_name, ignore_errors=True)
        self.builds += 1
        log.info("index of %s built as %s; %d updates replayed", self.folder.name, name, replayed)
        return True

    def _replay(self, fresh: qe.EdgeShard, start: int) -> int:
        """Apply the op log from `start` onto `fresh`; how many entries it has now been given."""
        oplog = self._oplog or []
        end = len(oplog)  # writers append under `write_lock`; entries before `end` are final
        for operation in oplog[start:end]:
            fresh.update(operation)
        return end

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
