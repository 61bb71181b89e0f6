"""Index builds and shard swaps (edge_index.py): searches do not wait while the built copy is
opened, and a process killed at any step of a swap restarts with one shard holding every
acknowledged write. Sizes are tiny; a low indexing threshold makes the engine build for them."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import qdrant_edge as qe

from services.retrieval import edge_index
from services.retrieval.edge_index import CURRENT, SHARD, recover, serving, version_name
from services.retrieval.edge_store import EdgeStore
from services.retrieval.vectorstores import Layout, Point

DIM = 16
FIRST, SECOND = 600, 100  # points written before a build starts, and while it runs
ROOT = Path(__file__).resolve().parents[3]


def rows(n: int, seed: int = 0) -> np.ndarray:
    data = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return data / np.linalg.norm(data, axis=1, keepdims=True)


def pts(data: np.ndarray, first: int = 0) -> list[Point]:
    return [Point(str(uuid.UUID(int=first + i + 1)), v.tolist(), {"document_id": f"d{i}"}) for i, v in enumerate(data)]


def crash_at(root: str, step: str) -> None:
    """In a child process: write points, start a build and SIGKILL this process at `step` of it.

    `building`: while the copy is being built; `built`: with the copy open and replayed, before
    `current` is replaced; `switched`: after `current` names the copy, before the old version is
    removed. The kill waits until every upsert has returned, so all of them are acknowledged.
    """
    acknowledged = threading.Event()
    real_optimize, real_point_at = edge_index.LiveShard._optimize, edge_index.point_at

    def optimize(shard: edge_index.LiveShard, folder: Path) -> bool:
        acknowledged.wait()  # so the second batch lands in the op log (or, first, in the copy)
        if step == "building":
            os.kill(os.getpid(), signal.SIGKILL)
        return real_optimize(shard, folder)

    def point_at(folder: Path, name: str) -> None:
        if step == "switched":
            real_point_at(folder, name)
        os.kill(os.getpid(), signal.SIGKILL)

    edge_index.LiveShard._optimize = optimize  # type: ignore[method-assign]
    edge_index.point_at = point_at
    store = EdgeStore(root, index_threshold_kb=16)
    store.create("c", Layout(DIM), {})
    store.upsert("c", pts(rows(FIRST)))  # 37.5 KiB of vectors: a build starts
    store.upsert("c", pts(rows(SECOND, seed=1), first=FIRST))
    print("acknowledged", flush=True)
    acknowledged.set()
    store.wait_indexed("c")


@pytest.mark.parametrize("step", ["building", "built", "switched"])
def test_a_process_killed_during_a_swap_restarts_with_every_write(tmp_path: Path, step: str) -> None:
    child = subprocess.run(
        [sys.executable, "-c", f"from {__name__} import crash_at; crash_at({str(tmp_path)!r}, {step!r})"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == -signal.SIGKILL and child.stdout == "acknowledged\n", child.stderr
    folder = tmp_path / "c"
    left = {p.name for p in folder.iterdir()}
    served = {"building": SHARD, "built": SHARD, "switched": version_name(1)}[step]
    assert {SHARD, version_name(1)} <= left and serving(folder) == served  # the state the kill left

    assert recover(folder) == served
    shards = sorted(p.name for p in folder.iterdir() if p.name.startswith(SHARD))
    assert shards == [served] and (CURRENT in left) == (step == "switched")
    store = EdgeStore(str(tmp_path), build_index=False)
    assert store.count("c") == FIRST + SECOND
    assert store.dense("c", rows(SECOND, seed=1)[-1].tolist(), 1, None)[0].id == str(uuid.UUID(int=FIRST + SECOND))
    store.close()


def test_a_search_during_a_swap_does_not_wait_for_the_built_copy_to_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each time the index thread opens a shard, the opening is held until a search has been tried."""
    opening: queue.Queue[threading.Event | None] = queue.Queue()
    real_load = qe.EdgeShard.load

    def load(path: str) -> Any:
        if threading.current_thread().name.startswith("index-"):
            go = threading.Event()
            opening.put(go)
            go.wait(120)
        return real_load(path)

    monkeypatch.setattr(qe.EdgeShard, "load", staticmethod(load))
    store = EdgeStore(str(tmp_path), index_threshold_kb=16)
    store.create("c", Layout(DIM), {})
    data = rows(FIRST)
    store.upsert("c", pts(data))  # starts a build

    def search_into(found: list[str]) -> None:
        found.append(store.dense("c", data[5].tolist(), 1, None)[0].id)

    watcher = threading.Thread(target=lambda: (store.wait_indexed("c"), opening.put(None)))
    watcher.start()
    answered: list[bool] = []
    while (go := opening.get(timeout=300)) is not None:
        found: list[str] = []
        search = threading.Thread(target=search_into, args=(found,))
        search.start()
        search.join(timeout=20)  # a search takes milliseconds; one that waits for the load outlasts this
        answered.append(found == [str(uuid.UUID(int=6))])
        go.set()
        search.join()
    watcher.join()
    assert answered and all(answered), answered
    assert store._shard("c").builds == 1 and store.info("c").indexed_vectors_count == FIRST
    store.close()
