"""Corpus ingests over real gRPC: progress per batch, the Ray Data path equal to the in-process one,
a bad file refusing the whole request, and a re-run replacing instead of duplicating.

The service starts a local Ray of its own (LLMP_RETRIEVAL_RAY=local); the corpus is a slice of
the Python standard library's documentation topics written as files into the artifact store.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from libs.common import corpora
from libs.common.clients.retrieval import RetrievalClient
from tests.helpers.services import ServiceProcess, start_service

pytestmark = pytest.mark.integration

DOCUMENTS = 24
CHUNKER = {"type": "recursive", "size": 96}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("llmp")
    folder = home / "artifacts" / "corpora" / "topics"
    folder.mkdir(parents=True)
    for name, text in list(corpora.pydoc_topics())[:DOCUMENTS]:
        (folder / f"{name}.txt").write_text(text)
    (folder / "skipped.bin").write_bytes(b"\xff\xfe not text")  # matches no pattern
    return home


@pytest.fixture(scope="module")
def service(home: Path) -> Iterator[ServiceProcess]:
    svc = start_service("retrieval", home, {"LLMP_RETRIEVAL_RAY": "local", "LLMP_RETRIEVAL_RAY_WORKERS": "1"})
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def client(service: ServiceProcess) -> Iterator[RetrievalClient]:
    c = RetrievalClient(service.address)
    yield c
    c.close()


def hits(client: RetrievalClient, collection: str) -> list[tuple[str, int, int, int]]:
    found = client.search(collection, "how are exceptions raised and handled", top_k=8, mode="dense")
    return [(h.document_id, h.chunk_index, h.start, h.end) for h in found]


def test_ray_data_ingest_equals_the_local_one_with_progress(client: RetrievalClient) -> None:
    results = {}
    for engine in ("local", "ray"):
        client.create(engine, embedder={"type": "static"}, chunker=CHUNKER)
        steps = list(client.ingest_corpus(engine, "corpora/topics", engine=engine, batch_documents=5))
        assert {s.engine for s in steps} == {engine}
        assert [s.documents_done for s in steps] == [0, 5, 10, 15, 20, DOCUMENTS]
        assert all(s.documents_total == DOCUMENTS for s in steps)
        assert steps[-1].chunks_done == client.describe(engine).points > DOCUMENTS
        results[engine] = (steps[-1].chunks_done, hits(client, engine))
    assert results["ray"] == results["local"]

    again = list(client.ingest_corpus("ray", "corpora/topics", engine="ray", batch_documents=8))
    assert again[-1].chunks_done == results["ray"][0] == client.describe("ray").points  # replaced, not added


def test_a_bad_file_refuses_the_whole_corpus(client: RetrievalClient, home: Path) -> None:
    client.create("strict", embedder={"type": "static"}, chunker=CHUNKER)
    bad = home / "artifacts" / "corpora" / "mixed"
    bad.mkdir()
    (bad / "a.txt").write_text("A fine document about generators and iterators.")
    (bad / "b.txt").write_bytes(b"caf\xe9 latin-1")
    with pytest.raises(grpc.RpcError) as e:
        list(client.ingest_corpus("strict", "corpora/mixed"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "corpora/mixed/b.txt" in e.value.details() and "UTF-8" in e.value.details()
    assert client.describe("strict").points == 0

    refused = [("corpora/none", "", "not in the artifact store"), ("corpora/topics", "gpu", "engine")]
    for path, engine, needle in refused:
        with pytest.raises(grpc.RpcError) as e:
            list(client.ingest_corpus("strict", path, engine=engine))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in e.value.details()
