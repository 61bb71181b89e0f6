"""The retrieval core on an embedded Qdrant in a temporary directory (no transport)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from libs.common.errors import AlreadyExists, InvalidArgument, NotFound
from services.retrieval.core import DocumentInput, Mmr, Query, RetrievalCore
from tests.helpers.retrieval_core import make_core

STATIC = {"type": "static"}
DOCS = [
    DocumentInput(id="cats", text="Cats purr when they are content. A cat sleeps most of the day.", metadata={"t": 1}),
    DocumentInput(id="rag", text="Retrieval-augmented generation adds retrieved passages to prompts.", source="r.md"),
    DocumentInput(id="kv", text="The KV cache stores attention keys and values of earlier tokens.", kind="text"),
]


def made(core: RetrievalCore, name: str = "c", **options) -> str:
    core.create_collection(name, embedder=STATIC, sparse=True, **options)
    core.ingest(name, DOCS)
    return name


def test_create_describe_list_delete(core: RetrievalCore) -> None:
    info = core.create_collection("c", embedder=STATIC, distance="dot", hnsw_m=8, quantization=True, sparse=True)
    assert info.dim == 384 and info.spec["hnsw"]["m"] == 8 and info.spec["quantization"]
    with pytest.raises(AlreadyExists):
        core.create_collection("c", embedder=STATIC)
    assert [i.name for i in core.list_collections()] == ["c"]
    assert core.delete_collection("c")
    with pytest.raises(NotFound, match="collection"):
        core.describe("c")


def test_the_quantizer_comes_from_the_collection_spec(core: RetrievalCore, tmp_path: Path) -> None:
    assert core.create_collection("b", embedder=STATIC, quantizer="binary").spec["quantization"] == "binary"
    assert core.create_collection("s", embedder=STATIC, quantization=True).spec["quantization"] == "scalar"
    assert core.create_collection("n", embedder=STATIC).spec["quantization"] is False
    engine = {n: json.loads((tmp_path / "qdrant_edge" / n / "shard" / "edge_config.json").read_text()) for n in "bsn"}
    assert "binary" in engine["b"]["quantization_config"] and "scalar" in engine["s"]["quantization_config"]
    assert engine["n"].get("quantization_config") is None
    with pytest.raises(InvalidArgument, match="scalar, binary") as refused:
        core.create_collection("x", embedder=STATIC, quantizer="pq")
    assert refused.value.field == "quantizer"


@pytest.mark.parametrize("mode", ["dense", "sparse", "hybrid"])
def test_search_finds_the_right_document(core: RetrievalCore, mode: str) -> None:
    made(core)
    hits = core.search(Query("c", "what does a key value cache store in attention", top_k=2, mode=mode))
    assert hits[0].document_id == "kv" and 1 <= len(hits) <= 2  # sparse finds only shared terms
    assert hits[0].text == DOCS[2].text[hits[0].start : hits[0].end]


def test_filters_and_malformed_filters(core: RetrievalCore) -> None:
    made(core)
    only = {"must": [{"key": "source", "match": {"value": "r.md"}}]}
    assert {h.document_id for h in core.search(Query("c", "cats", filter=only))} == {"rag"}
    by_meta = {"must": [{"key": "metadata.t", "match": {"value": 1}}]}
    assert {h.document_id for h in core.search(Query("c", "cache", filter=by_meta))} == {"cats"}
    with pytest.raises(InvalidArgument, match="filter"):
        core.search(Query("c", "cats", filter={"must": [{"key": "source", "match": 3}]}))


def test_mmr_reranks_candidates(core: RetrievalCore) -> None:
    made(core)
    plain = core.search(Query("c", "cats purr", top_k=3))
    diverse = core.search(Query("c", "cats purr", top_k=3, mmr=Mmr(diversity=0.9, candidates=3)))
    assert {h.document_id for h in diverse} == {h.document_id for h in plain}
    assert diverse[0].document_id == "cats"


def test_reingest_replaces_and_retries_never_duplicate(core: RetrievalCore) -> None:
    made(core)
    before = core.describe("c").points
    again = core.ingest("c", DOCS)
    assert core.describe("c").points == before and [d.replaced for d in again] == [d.chunks for d in again]
    long = " ".join(f"Sentence number {i} about caching keys." for i in range(60))
    grown = core.ingest("c", [DocumentInput(id="kv", text=long)], {"type": "fixed", "size": 32, "overlap": 0})
    assert grown[0].chunks > 1 and core.describe("c").points == before - 1 + grown[0].chunks
    shrunk = core.ingest("c", [DocumentInput(id="kv", text="Short now.")])
    assert shrunk[0].replaced == grown[0].chunks and core.describe("c").points == before
    assert core.delete_documents("c", ["kv"]) == 1 and core.describe("c").points == before - 1


def test_a_bad_document_writes_nothing(core: RetrievalCore) -> None:
    core.create_collection("c", embedder=STATIC)
    batch = [DocumentInput(id="good", text="fine text"), DocumentInput(id="empty", text="   ")]
    with pytest.raises(InvalidArgument, match=r"documents\[1\]\.text"):
        core.ingest("c", batch)
    with pytest.raises(InvalidArgument, match=r"documents\[0\]\.text"):
        core.ingest("c", [DocumentInput(id="big", text="x " * 20_000)])
    with pytest.raises(InvalidArgument, match=r"documents\.id"):
        core.ingest("c", [DocumentInput(id="a", text="one"), DocumentInput(id="a", text="two")])
    with pytest.raises(InvalidArgument, match=r"documents\[0\]\.path"):
        core.ingest("c", [DocumentInput(path="../etc/passwd")])
    assert core.describe("c").points == 0


def test_documents_from_the_artifact_store(core: RetrievalCore) -> None:
    core.create_collection("c", embedder=STATIC)
    (core.artifacts.root / "docs").mkdir()
    (core.artifacts.root / "docs" / "a.md").write_text("# Title\n\nSome words about retrieval.\n")
    done = core.ingest("c", [DocumentInput(path="docs/a.md")])
    hit = core.search(Query("c", "retrieval", top_k=1))[0]
    assert done[0].id == "docs/a.md" and hit.source == "docs/a.md" and hit.section == "Title"


def test_errors_name_the_field(core: RetrievalCore) -> None:
    core.create_collection("c", embedder=STATIC)
    cases = [
        (lambda: core.search(Query("nope", "q")), NotFound, "collection"),
        (lambda: core.create_collection("d", embedder={"type": "word2vec"}), InvalidArgument, "embedder.type"),
        (lambda: core.create_collection("d", embedder=STATIC, dim=768), InvalidArgument, "dim"),
        (lambda: core.create_collection("d", embedder={"type": "bm25"}), InvalidArgument, "embedder"),
        (lambda: core.search(Query("c", "q", mode="sparse")), InvalidArgument, "mode"),
        (lambda: core.search(Query("c", " ")), InvalidArgument, "query"),
        (lambda: core.search(Query("c", "q", top_k=5000)), InvalidArgument, "top_k"),
        (lambda: core.embed([]), InvalidArgument, "texts"),
        (lambda: core.ingest("c", [DocumentInput(id="x", text="t", kind="pdf")]), InvalidArgument, "kind"),
    ]
    for call, error, field in cases:
        with pytest.raises(error, match=field):
            call()


def test_dimension_mismatch_on_ingest(core: RetrievalCore) -> None:
    core.create_collection("c", embedder=STATIC)
    core.store.metadata = lambda name: {**type(core.store).metadata(core.store, name), "dim": 768}  # type: ignore[method-assign]
    with pytest.raises(InvalidArgument, match="dimension mismatch"):
        core.ingest("c", DOCS)
    assert core.store.count("c") == 0


def test_embed_counts_tokens(core: RetrievalCore) -> None:
    rows, tokens, name = core.embed(["hello world", "a b c"], STATIC)
    assert rows.shape == (2, 384) and tokens == 5 and name == "static"


def test_context_fits_the_budget_with_citations(core: RetrievalCore) -> None:
    made(core)
    q = Query("c", "what does the KV cache store?", top_k=3)
    wide = core.build_context(q, max_tokens=400)
    assert [c.number for c in wide.citations] == [1, 2, 3] and wide.dropped == 0
    assert wide.citations[0].document_id == "kv" and "[1] kv (characters 0-" in wide.prompt
    narrow = core.build_context(q, max_tokens=wide.tokens - 5)
    assert narrow.tokens <= wide.tokens - 5 and narrow.dropped >= 1
    with pytest.raises(InvalidArgument, match="max_tokens"):
        core.build_context(q, max_tokens=5)


def test_collections_survive_a_reopen(tmp_path: Path) -> None:
    first = make_core(tmp_path)
    made(first)
    expected = first.search(Query("c", "attention keys", top_k=3, mode="hybrid"))
    first.store.close()
    second = make_core(tmp_path)
    assert second.describe("c").points == 3
    assert second.search(Query("c", "attention keys", top_k=3, mode="hybrid")) == expected
    second.store.close()


@pytest.mark.parametrize("mode", ["sparse", "hybrid"])
def test_qdrant_bm25_collections_search_by_stems(core: RetrievalCore, mode: str) -> None:
    core.create_collection("q", embedder=STATIC, sparse=True, sparse_embedder={"type": "qdrant_bm25"})
    core.ingest("q", DOCS)
    assert core.spec("q")["sparse_embedder"] == {"type": "qdrant_bm25"}
    hits = core.search(Query("q", "caching", top_k=1, mode=mode))  # "caching" and "cache" stem to one term
    assert hits[0].document_id == "kv"
