"""The retrieval service as a real process over real gRPC: collections, ingest, search, context,
errors, health and reflection, durability across a restart, and token-aware chunking through a
real tokenizer service.

The embedded Qdrant is used here; a Qdrant server cannot run on this machine. The server path is
the same code, selected by LLMP_QDRANT_URL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from llmp.retrieval.v1 import retrieval_pb2 as pb
from llmp.tokenizer.v1 import tokenizer_pb2 as tokenizer_pb

from libs.common.clients.retrieval import RetrievalClient
from libs.common.clients.tokenizer import TokenizerClient
from services.retrieval.chunkers import CHUNKERS
from services.retrieval.embedders import load_tokenizer, packaged_minilm
from services.retrieval.tokens import LocalTokens
from tests.helpers.services import ServiceProcess, start_service

pytestmark = pytest.mark.integration

SEED = (Path(__file__).resolve().parents[2] / "services" / "retrieval" / "eval" / "seed.md").read_text()
FIXED = {"type": "fixed", "size": 96, "overlap": 16}


def code_of(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call(*args, **kwargs)
    return e.value.code(), e.value.details()


@pytest.fixture(scope="module")
def tokenizer_service(tmp_path_factory: pytest.TempPathFactory):
    service = start_service("tokenizer", tmp_path_factory.mktemp("tok"))
    data = (packaged_minilm() / "tokenizer.json").read_bytes()  # the service reads no caller's paths
    request = tokenizer_pb.ImportRequest(name="minilm", data=data, format="tokenizer.json")
    TokenizerClient(service.address).stub.Import(request)
    yield service
    service.stop()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("llmp")


@pytest.fixture(scope="module")
def service(home: Path, tokenizer_service: ServiceProcess):
    svc = start_service("retrieval", home, {"LLMP_TOKENIZER_ADDRESS": tokenizer_service.address})
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def client(service: ServiceProcess) -> RetrievalClient:
    c = RetrievalClient(service.address)
    c.create("seed", sparse=True, hnsw=pb.HnswConfig(m=16, ef_construct=64))
    c.ingest("seed", [pb.Document(id="seed", text=SEED, kind="markdown", source="seed.md")])
    return c


def test_health_and_reflection(service: ServiceProcess) -> None:
    with grpc.insecure_channel(service.address) as ch:
        check = health_pb2.HealthCheckRequest(service="llmp.retrieval.v1.RetrievalService")
        reply = health_pb2_grpc.HealthStub(ch).Check(check)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stream = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name for r in stream for s in r.list_services_response.service}
    assert "llmp.retrieval.v1.RetrievalService" in names


def test_search_modes_and_context(client: RetrievalClient) -> None:
    for mode in ("dense", "sparse", "hybrid"):
        hits = client.search("seed", "How does speculative decoding speed up inference?", top_k=5, mode=mode)
        assert any("Speculative Decoding" in h.section for h in hits[:3]), mode
        assert all(SEED[h.start : h.end] == h.text for h in hits)
    search = pb.SearchRequest(collection="seed", query="What is a KV cache?", top_k=4, mode="hybrid")
    built = client.context(search, max_tokens=300)
    assert built.tokens <= 300 and built.citations[0].number == 1 and "[1] seed.md" in built.prompt


def test_embed_matches_sentence_transformers(client: RetrievalClient) -> None:
    from sentence_transformers import SentenceTransformer

    texts = ["The KV cache stores keys and values.", "BPE merges frequent pairs."]
    remote = client.embed(texts, collection="seed")
    local = SentenceTransformer(str(packaged_minilm()), device="cpu").encode(texts, normalize_embeddings=True)
    assert close_rows(remote, local.tolist())


def close_rows(a: list[list[float]], b: list[list[float]]) -> bool:
    return all(abs(x - y) < 1e-4 for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))


def test_errors_are_status_codes_naming_the_field(client: RetrievalClient) -> None:
    points = client.describe("seed").points
    assert code_of(client.search, "missing", "q")[0] == grpc.StatusCode.NOT_FOUND
    code, details = code_of(client.create, "x", embedder={"type": "word2vec"})
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "embedder.type" in details
    code, details = code_of(client.search, "seed", "q", filter={"must": "nonsense"})
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "filter" in details
    code, details = code_of(client.ingest, "seed", [pb.Document(id="a", text="ok"), pb.Document(id="b", text="")])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "documents[1]" in details
    code, details = code_of(client.create, "x", dim=17)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "dim" in details
    code, details = code_of(client.create, "x", quantizer="pq")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "quantizer" in details
    assert client.create("binary", embedder={"type": "static"}, quantizer="binary").spec["quantization"] == "binary"
    assert client.delete("binary")
    assert client.describe("seed").points == points


def test_token_aware_chunking_through_the_tokenizer_service(client: RetrievalClient) -> None:
    client.create("viaservice", embedder={"type": "static"})
    via_service = client.ingest("viaservice", [pb.Document(id="seed", text=SEED)], {**FIXED, "tokenizer": "minilm"})
    local = CHUNKERS.create(FIXED).split(SEED, "text", LocalTokens(load_tokenizer(packaged_minilm())))
    assert via_service.chunks == len(local)
    hits = client.search("viaservice", "byte pair encoding", top_k=50)
    assert {(h.start, h.end) for h in hits} <= {(c.start, c.end) for c in local}
    unknown = {"type": "fixed", "tokenizer": "nope"}
    code, details = code_of(client.ingest, "viaservice", [pb.Document(id="s", text="x")], unknown)
    assert code == grpc.StatusCode.NOT_FOUND and "chunker.tokenizer" in details


def test_command_line(service: ServiceProcess, tmp_path: Path) -> None:
    """`llmp retrieval` against the real service: create, ingest local files, search, context, refusals."""
    from click.testing import CliRunner

    from libs.common.cli.retrieval import group

    env = {"LLMP_RETRIEVAL_ADDRESS": service.address}
    note = tmp_path / "kv.md"
    note.write_text("# KV cache\n\nThe paged KV cache keeps each sequence's keys and values in fixed-size blocks.\n")

    def llmp(*args: str) -> Any:
        return CliRunner().invoke(group, list(args), env=env)

    created = llmp("create", "cli-notes", "--embedder", '{"type": "static"}', "--sparse")
    assert created.exit_code == 0 and "cli-notes: 0 chunks" in created.output, created.output
    ingested = llmp("ingest", "cli-notes", str(note))
    assert ingested.exit_code == 0 and "1 documents" in ingested.output, ingested.output
    built = llmp("context", "cli-notes", "Where are keys and values kept?", "--mode", "hybrid")
    assert built.exit_code == 0 and "[1] " + str(note) in built.output, built.output
    hits = RetrievalClient(service.address).search("cli-notes", "fixed-size blocks", mode="hybrid")
    assert hits and hits[0].document_id == str(note)
    bad = llmp("create", "cli-other", "--embedder", "{not json")
    assert bad.exit_code == 2 and "not JSON" in bad.output
    assert "cli-other" not in {c.name for c in RetrievalClient(service.address).list_collections()}
    missing = llmp("search", "no-such-collection", "q")
    assert missing.exit_code != 0 and "NOT_FOUND" in str(missing.exception)


# Last: it stops the module's service.
def test_restart_keeps_collections_and_points(client: RetrievalClient, service: ServiceProcess, home: Path) -> None:
    before = client.search("seed", "reward model", top_k=3, mode="hybrid")
    points = client.describe("seed").points
    assert service.stop() == 0
    again = start_service("retrieval", home)
    try:
        fresh = RetrievalClient(again.address)
        assert fresh.describe("seed").points == points
        assert [(h.document_id, h.start) for h in fresh.search("seed", "reward model", top_k=3, mode="hybrid")] == [
            (h.document_id, h.start) for h in before
        ]
        fresh.close()
    finally:
        again.stop()
