"""The retrieval core's bounds: chunk sizes and counts, MMR candidates, HNSW sizes, embedder sizes, and a
model load that does not stop searches."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from libs.common.errors import InvalidArgument
from services.retrieval import core as core_module
from services.retrieval.core import DocumentInput, Mmr, Query, RetrievalCore
from tests.helpers.retrieval_core import make_core

STATIC = {"type": "static"}
TEXT = " ".join(f"Sentence number {i} says something about topic {i % 7}." for i in range(60))


@pytest.fixture
def small(tmp_path: Path) -> Iterator[RetrievalCore]:
    c = make_core(
        tmp_path, max_chunk_tokens=64, max_chunks_per_document=10, max_ingest_chunks=15, max_mmr_candidates=20
    )
    c.create_collection("c", embedder=STATIC, chunker={"type": "fixed", "size": 32, "overlap": 0})
    yield c
    c.store.close()


def test_chunker_size_is_capped(small: RetrievalCore) -> None:
    with pytest.raises(InvalidArgument) as e:
        small.ingest("c", [DocumentInput(id="a", text="x")], chunker={"type": "fixed", "size": 10**9, "overlap": 0})
    assert e.value.field == "chunker.size"


def test_chunks_per_document_and_per_call_are_capped(small: RetrievalCore) -> None:
    with pytest.raises(InvalidArgument) as per_document:
        small.ingest("c", [DocumentInput(id="a", text=TEXT)], chunker={"type": "fixed", "size": 4, "overlap": 3})
    assert per_document.value.field == "documents[0].text"
    part = TEXT[: len(TEXT) // 3]
    with pytest.raises(InvalidArgument) as per_call:
        small.ingest("c", [DocumentInput(id=str(i), text=part) for i in range(3)])
    assert per_call.value.field == "documents"
    assert small.describe("c").points == 0, "nothing was written"
    assert small.ingest("c", [DocumentInput(id="ok", text=part)])[0].chunks > 1


def test_mmr_candidates_and_hnsw_sizes_are_capped(small: RetrievalCore) -> None:
    small.ingest("c", [DocumentInput(id="ok", text=TEXT[:300])])
    with pytest.raises(InvalidArgument) as mmr:
        small.search(Query("c", "topic", top_k=2, mmr=Mmr(0.5, 10**6)))
    assert mmr.value.field == "mmr.candidates"
    assert small.search(Query("c", "topic", top_k=2, mmr=Mmr(0.5, 0)))
    with pytest.raises(InvalidArgument) as hnsw:
        small.create_collection("d", embedder=STATIC, hnsw_m=2**31)
    assert hnsw.value.field == "hnsw.m"


@pytest.mark.parametrize(
    "spec", [{"type": "static", "path": "x" * 5000}, {"type": "sentence_transformers", "batch_size": 10**9}]
)
def test_embedder_sizes_are_refused(small: RetrievalCore, spec: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        small.embed(["hello"], spec)


def test_a_model_load_does_not_stop_searches(small: RetrievalCore, monkeypatch: pytest.MonkeyPatch) -> None:
    """While one spec's model loads (held here on an event), searches with a loaded model go on."""
    small.ingest("c", [DocumentInput(id="ok", text=TEXT[:300])])
    loading, release = threading.Event(), threading.Event()
    create = core_module.EMBEDDERS.create
    timed_out: list[bool] = []

    def slow_create(spec: dict[str, Any], **kwargs: Any) -> Any:
        if spec.get("path") == "slow":
            loading.set()
            timed_out.append(not release.wait(60))  # True: the search could not run until the load gave up
            raise InvalidArgument("no such model", field="embedder.path")
        return create(spec, **kwargs)

    monkeypatch.setattr(core_module.EMBEDDERS, "create", slow_create)
    errors: list[Exception] = []

    def load() -> None:
        try:
            small.encoder({"type": "static", "path": "slow"})
        except InvalidArgument as e:
            errors.append(e)

    loader = threading.Thread(target=load)
    loader.start()
    try:
        assert loading.wait(60)
        hits = small.search(Query("c", "topic", top_k=1))  # would wait for the load under one shared lock
        assert hits and hits[0].document_id == "ok"
    finally:
        release.set()
        loader.join(60)
    assert len(errors) == 1 and timed_out == [False]
