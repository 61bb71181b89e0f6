"""The same vector-store calls through Qdrant Edge, qdrant-client's local mode and a Qdrant server
give the same answers: exact search, filters, counts, deletes, records, sparse search with IDF,
and hybrid fusion and MMR (done by the engine in Qdrant Edge, in Python for the others).

Qdrant Edge is the reference; local mode always runs; the server needs LLMP_QDRANT_URL or a
`qdrant` binary on PATH that the test starts on free ports with its own storage, and is skipped,
saying so, where neither exists (no Docker and no Qdrant binary can be installed on the
development machines). Searches use exact=True so every side ranks exactly and must agree point
for point; HNSW recall is measured by `python -m bench retrieval` instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from libs.common.ports import free_port
from services.retrieval.edge_store import EdgeStore
from services.retrieval.embedders import SparseVector
from services.retrieval.vectorstores import Layout, Point, QdrantStore, Search, VectorStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DIM, N = 32, 300
RECORDS = "_congruence_records"
FILTERS: list[dict[str, Any]] = [
    {"must": [{"key": "document_id", "match": {"value": "d3"}}]},
    {"must": {"key": "document_id", "match": {"any": ["d1", "d2"]}}},
    {"must": [{"key": "document_id", "match": {"except": ["d1", "d2"]}}]},
    {"must_not": [{"key": "document_id", "match": {"value": "d0"}}]},
    {"should": [{"key": "n", "range": {"lt": 20}}, {"key": "n", "range": {"gte": 280}}]},
    {"must": [{"key": "n", "range": {"gt": 10.5, "lte": 40}}, {"key": "tags", "values_count": {"gte": 2}}]},
    {"min_should": {"conditions": [{"key": "n", "range": {"lt": 100}}, {"key": "odd", "match": {"value": True}}],
                    "min_count": 2}},
    {"must": [{"key": "meta.group", "match": {"value": 2}}]},
    {"must": [{"is_empty": {"key": "tags"}}]},
    {"must": [{"is_null": {"key": "note"}}]},
    {"must": [{"has_id": [str(uuid.UUID(int=i + 1)) for i in range(0, N, 7)]}]},
    {"must": [{"key": "text", "match": {"text": "seven"}}]},
    {"must": [{"key": "when", "range": {"gte": "2024-03-01T00:00:00Z"}}]},
    {"must": [{"nested": {"key": "parts", "filter": {"must": [{"key": "k", "match": {"value": "a"}}]}}}]},
]  # fmt: skip


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if url := os.environ.get("LLMP_QDRANT_URL"):
        yield url
        return
    binary = shutil.which("qdrant")
    if not binary:
        pytest.skip("needs a Qdrant server: set LLMP_QDRANT_URL or put a `qdrant` binary on PATH; neither is here")
    storage = tmp_path_factory.mktemp("qdrant")
    http, grpc_port = free_port(), free_port()
    env = {
        **os.environ,
        "QDRANT__STORAGE__STORAGE_PATH": str(storage),
        "QDRANT__SERVICE__HTTP_PORT": str(http),
        "QDRANT__SERVICE__GRPC_PORT": str(grpc_port),
    }
    proc = subprocess.Popen([binary], cwd=storage, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http}"
    from qdrant_client import QdrantClient

    client = QdrantClient(url=url, timeout=1)
    for _ in range(600):  # polls readiness, at most about a minute
        try:
            client.get_collections()
            break
        except Exception:
            if proc.poll() is not None:
                pytest.fail(f"qdrant exited with {proc.returncode}")
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(30)


def payload(i: int) -> dict[str, Any]:
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven"]
    out: dict[str, Any] = {
        "document_id": f"d{i % 7}",
        "n": i,
        "odd": bool(i % 2),
        "meta": {"group": i % 4},
        "text": f"chunk {words[i % 8]} of {i}",
        "when": f"2024-{1 + i % 6:02d}-15T12:00:00Z",
        "parts": [{"k": "a" if i % 5 == 0 else "b"}],
        "note": None if i % 9 == 0 else "x",
    }
    if i % 3:
        out["tags"] = ["t"] * (i % 3)
    return out


def sparse(i: int) -> SparseVector:
    """Terms 0..49 are each held by 6 points, terms 50..62 by 23 (so their IDF differs); weights never tie."""
    return SparseVector([i % 50, 50 + i % 13], [1.0 + i / 1000, 0.5 + i / 2000])


def points() -> tuple[np.ndarray, list[Point]]:
    rng = np.random.default_rng(0)
    data = rng.standard_normal((N, DIM)).astype(np.float32)
    made = [Point(str(uuid.UUID(int=i + 1)), data[i].tolist(), payload(i), sparse(i)) for i in range(N)]
    return data, made


def results(store: VectorStore, name: str) -> tuple[Any, ...]:
    """Every call of the interface, in one fixed sequence, and what each gave."""
    data, made = points()
    store.create(name, Layout(DIM, sparse=True), {"spec": {"dim": DIM}})
    store.upsert(name, made)
    counts = [store.count(name, f) for f in FILTERS]
    # Before the delete: engines may keep a deleted point in the IDF statistics until they compact.
    found = store.sparse(name, SparseVector([3, 60], [1.0, 1.0]), 10, None)
    deleted = store.delete(name, {"must": [{"key": "document_id", "match": {"value": "d5"}}]})
    store.put_record(RECORDS, str(uuid.UUID(int=9)), {"k": "v"})
    store.put_record(RECORDS, str(uuid.UUID(int=10)), {"k": "w"})
    store.drop_record(RECORDS, str(uuid.UUID(int=10)))
    searched = [[f.id for f in store.dense(name, data[1].tolist(), 5, f, exact=True)] for f in FILTERS]
    out = (
        store.metadata(name),
        store.count(name),
        counts,
        deleted,
        [(f.id, round(f.score, 4)) for f in store.dense(name, data[0].tolist(), 10, None, exact=True)],
        searched,
        [(f.id, round(f.score, 4)) for f in found],
        store.records(RECORDS),
        name in store.names() and RECORDS not in store.names(),
        sorted(store.vectors(name, [made[0].id, made[1].id])),
    )
    return out


def hybrid_and_mmr(store: VectorStore, name: str) -> tuple[Any, ...]:
    data, _ = points()
    query = (data[2] + 0.5 * data[3]).tolist()
    fused = store.search(name, Search(8, dense=query, sparse=SparseVector([2, 52], [1.0, 1.0])))
    diverse = store.search(name, Search(5, dense=query, mmr=0.6, candidates=20, mmr_vector=query))
    plain = store.search(name, Search(5, dense=query, mmr=0.0, candidates=20, mmr_vector=query))
    return (
        [(f.id, round(f.score, 4)) for f in fused],  # RRF ties (rank r in one list only) go to the dense hit
        [f.id for f in diverse],
        [f.id for f in plain] == [f.id for f in store.dense(name, query, 5, None, exact=True)],
    )


def run(store: VectorStore) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    name = f"congruence-{uuid.uuid4().hex[:8]}"
    try:
        return results(store, name), hybrid_and_mmr(store, name)
    finally:
        store.drop(name)
        store.drop(RECORDS)
        store.close()


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    return run(EdgeStore(str(tmp_path_factory.mktemp("edge"))))


def test_edge_and_local_mode_agree(edge: tuple[Any, ...], tmp_path: Path) -> None:
    local = run(QdrantStore(path=str(tmp_path / "local")))
    assert edge[0] == local[0]
    assert edge[1] == local[1]
    assert edge[1][2]  # MMR with no diversity is plain nearest-neighbour order


def test_edge_and_a_server_agree(edge: tuple[Any, ...], server_url: str) -> None:
    assert run(QdrantStore(url=server_url)) == edge


def test_filters_select_points(edge: tuple[Any, ...]) -> None:
    counts = edge[0][2]
    assert all(0 < c < N for c in counts), counts  # every filter both keeps and drops points
