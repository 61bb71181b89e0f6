"""The same vector-store calls through the embedded Qdrant and a Qdrant server give the same answers.

Needs a server: LLMP_QDRANT_URL, or a `qdrant` binary on PATH that the test starts on free ports
with its own storage. Skipped, saying so, where neither exists (no Docker and no Qdrant binary
can be installed on the development machines). Searches on the server use exact=True, so both
sides rank exactly and must agree point for point; HNSW recall is measured by `python -m bench
retrieval` instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from services.retrieval.embedders import SparseVector
from services.retrieval.vectorstores import Layout, Point, QdrantStore
from tests.conftest import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


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


def both(server_url: str, tmp_path: Path) -> Iterator[QdrantStore]:
    yield QdrantStore(path=str(tmp_path / "embedded"))
    yield QdrantStore(url=server_url)


def test_the_same_calls_give_the_same_results(server_url: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = rng.standard_normal((300, 32)).astype(np.float32)
    points = [
        Point(
            str(uuid.UUID(int=i + 1)),
            data[i].tolist(),
            {"document_id": f"d{i % 7}", "n": i},
            SparseVector([i % 50, 50 + i % 13], [1.0, 0.5]),
        )
        for i in range(300)
    ]
    name = f"congruence-{uuid.uuid4().hex[:8]}"
    results = []
    for store in both(server_url, tmp_path):
        store.create(name, Layout(32, sparse=True), {"spec": {"dim": 32}})
        store.upsert(name, points)
        only_d3 = {"must": [{"key": "document_id", "match": {"value": "d3"}}]}
        deleted = store.delete(name, {"must": [{"key": "document_id", "match": {"value": "d5"}}]})
        store.put_record("_congruence_records", str(uuid.UUID(int=9)), {"k": "v"})
        results.append(
            (
                store.metadata(name),
                store.count(name),
                store.count(name, only_d3),
                deleted,
                [(f.id, round(f.score, 4)) for f in store.dense(name, data[0].tolist(), 10, None, exact=True)],
                [f.id for f in store.dense(name, data[1].tolist(), 5, only_d3, exact=True)],
                [f.id for f in store.sparse(name, SparseVector([3], [1.0]), 5, None)],
                store.records("_congruence_records"),
                name in store.names() and "_congruence_records" not in store.names(),
            )
        )
        store.drop(name)
        store.drop("_congruence_records")
        store.close()
    embedded, server = results
    assert embedded == server
