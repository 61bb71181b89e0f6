"""Retrieval quality on the labelled set (services/retrieval/eval/questions.jsonl).

Ingests the seed document and Python's reference text into Qdrant Edge (the local default store)
in a temporary directory, once per chunker (fixed 256-token windows with 32 overlap, recursive by
structure up to 256 tokens) and sparse encoder (`bm25`: our hashed terms; `qdrant_bm25`: Qdrant's
own tokenizer, stop words and stemmer; both weighted by the engine's IDF modifier), with the
packaged all-MiniLM-L6-v2 embedded once per chunker, and reports recall@1/5/10 and MRR for dense,
sparse and hybrid (RRF, fused by the engine) search. A hit is a chunk overlapping the answer span.

Run: python -m bench retrieval_eval [--chunkers=recursive]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from libs.common.artifacts import ArtifactStore
from services.retrieval.config import RetrievalConfig
from services.retrieval.core import DocumentInput, Hit, Query, RetrievalCore
from services.retrieval.edge_store import EdgeStore
from services.retrieval.eval.make_questions import OUT, corpus

CHUNKERS = {"fixed": {"type": "fixed", "size": 256, "overlap": 32}, "recursive": {"type": "recursive", "size": 256}}
SPARSE = {"bm25": {"type": "bm25"}, "qdrant_bm25": {"type": "qdrant_bm25"}}
MODES = ("dense", "sparse", "hybrid")
KS = (1, 5, 10)


def load_questions() -> list[dict]:
    rows = [json.loads(line) for line in OUT.read_text().splitlines()]
    return [r for r in rows if "question" in r]


def first_relevant(hits: list[Hit], q: dict) -> int | None:
    """1-based rank of the first hit overlapping the answer span, or None."""
    for rank, h in enumerate(hits, start=1):
        if h.source == q["source"] and h.start < q["end"] and q["start"] < h.end:
            return rank
    return None


def scores(ranks: list[int | None]) -> dict[str, float]:
    n = len(ranks)
    out = {f"R@{k}": sum(1 for r in ranks if r is not None and r <= k) / n for k in KS}
    out["MRR"] = sum(1 / r for r in ranks if r is not None) / n
    return out


def evaluate(core: RetrievalCore, name: str, questions: list[dict]) -> dict[str, dict[str, float]]:
    return {
        mode: scores([first_relevant(core.search(Query(name, q["question"], 10, mode)), q) for q in questions])
        for mode in MODES
    }


def ingest(core: RetrievalCore, chunking: str, documents: list[DocumentInput]) -> int:
    """One collection per sparse encoder, the chunks embedded once and written to each; chunks per collection."""
    names = [f"{chunking}-{sparse}" for sparse in SPARSE]
    for name, spec in zip(names, SPARSE.values(), strict=True):
        core.create_collection(name, sparse=True, sparse_embedder=spec, chunker=CHUNKERS[chunking])
    plan = core.plan(core.spec(names[0]))
    prepared = core.prepare(plan, documents)
    vectors = core.vectors(plan, prepared)
    for name, spec in zip(names, SPARSE.values(), strict=True):
        encoder = core.sparse_encoder(spec)
        for doc, rows in zip(prepared, vectors, strict=True):
            core.write(name, doc, rows, encoder)
    return sum(len(p.chunks) for p in prepared)


def main() -> None:
    questions = load_questions()
    documents = [
        DocumentInput(id=source, text=text, source=source, kind="markdown" if source.endswith(".md") else "text")
        for source, text in corpus().items()
    ]
    print(f"retrieval eval: {len(questions)} questions over {len(documents)} documents (Qdrant Edge)")
    with tempfile.TemporaryDirectory() as tmp:
        core = RetrievalCore(RetrievalConfig(), ArtifactStore(Path(tmp) / "artifacts"), EdgeStore(f"{tmp}/qdrant_edge"))
        chosen = next((a.split("=", 1)[1].split(",") for a in sys.argv if a.startswith("--chunkers=")), CHUNKERS)
        for chunking in chosen:
            start = time.perf_counter()
            chunks = ingest(core, chunking, documents)
            print(f"  {chunking}: {chunks} chunks ingested in {time.perf_counter() - start:.1f}s")
            for sparse in SPARSE:
                for mode, row in evaluate(core, f"{chunking}-{sparse}", questions).items():
                    if mode == "dense" and sparse != next(iter(SPARSE)):
                        continue  # the same dense vectors: one row is enough
                    label = mode if mode == "dense" else f"{mode} ({sparse})"
                    print(f"  {chunking:9s} {label:20s} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()))
        core.store.close()


if __name__ == "__main__":
    main()
