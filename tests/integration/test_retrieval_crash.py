"""A retrieval service killed in the middle of replacing a document loses nothing and duplicates nothing.

The service process kills itself (SIGKILL, no clean-up) at a named step of a re-ingest through
the LLMP_RETRIEVAL_FAULT_POINT test hook. After a restart, search sees exactly one whole version
of the document — the new one if all its chunks were stored, the old one otherwise — and a
retry of the interrupted call converges to the new version.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from llmp.retrieval.v1 import retrieval_pb2 as pb

from libs.common.clients.retrieval import RetrievalClient
from tests.helpers.services import start_service

pytestmark = pytest.mark.integration

CHUNKER = {"type": "fixed", "size": 24, "overlap": 0}
OLD = " ".join(f"Old paragraph {i} talks about tokenisers and their vocabularies." for i in range(6))
NEW = " ".join(f"New paragraph {i} explains speculative decoding with a draft." for i in range(3))


def version(text: str) -> str:
    """Which version a chunk comes from, by the words only that version uses."""
    words = set(text.split())
    return "Old" if words & {"Old", "tokenisers", "talks"} else "New" if words & {"New", "speculative"} else "?"


def versions(client: RetrievalClient) -> set[str]:
    hits = client.search("docs", "paragraph", top_k=100, mode="dense")
    return {version(h.text) for h in hits if h.document_id == "d"}


@pytest.mark.parametrize(("fault", "survivor"), [("after_journal", "Old"), ("after_upsert", "New")])
def test_a_crash_mid_replace_leaves_one_whole_version(tmp_path: Path, fault: str, survivor: str) -> None:
    service = start_service("retrieval", tmp_path)
    client = RetrievalClient(service.address)
    client.create("docs", embedder={"type": "static"}, chunker=CHUNKER)
    old = client.ingest("docs", [pb.Document(id="d", text=OLD), pb.Document(id="other", text="unrelated text")])
    old_chunks = old.documents[0].chunks
    assert versions(client) == {"Old"}
    client.close()
    assert service.stop() == 0

    dying = start_service("retrieval", tmp_path, {"LLMP_RETRIEVAL_FAULT_POINT": fault})
    client = RetrievalClient(dying.address)
    with pytest.raises(grpc.RpcError) as e:
        client.ingest("docs", [pb.Document(id="d", text=NEW)])
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert dying.proc.wait(60) == -9  # killed, not stopped
    client.close()

    again = start_service("retrieval", tmp_path)
    client = RetrievalClient(again.address)
    try:
        assert versions(client) == {survivor}
        hits = [h for h in client.search("docs", "paragraph", top_k=100) if h.document_id == "d"]
        # One whole version: its chunks numbered 0..n-1 once each, and nothing else of "d" stored.
        assert sorted(h.chunk_index for h in hits) == list(range(len(hits)))
        assert survivor == "New" or len(hits) == old_chunks
        assert client.describe("docs").points == len(hits) + 1  # + the untouched "other" document

        retried = client.ingest("docs", [pb.Document(id="d", text=NEW)])
        new_chunks = retried.documents[0].chunks
        assert new_chunks < old_chunks  # so leftovers of the old version would show in the count
        assert versions(client) == {"New"}
        assert client.describe("docs").points == new_chunks + 1
    finally:
        client.close()
        again.stop()
