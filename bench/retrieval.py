"""Retrieval service benchmarks, each against its reference measured in the same run.

1. Embedding throughput through the service (Embed over gRPC, the packaged all-MiniLM-L6-v2)
   vs sentence-transformers called in-process on the same texts and batches (target >= 0.8x).
2. Ingest throughput end to end through the service (IngestCorpus: chunk, embed, BM25, journal,
   write into Qdrant Edge) vs embedding the same chunks alone in-process.
3. Vector search in Qdrant Edge (bench/retrieval_search.py): HNSW latency and recall against the
   engine's exact search, index build, memory, and the former local mode on the same data.
   Flags: --million (adds 1M vectors: 1.5 GB of float32, a build of tens of minutes on two cores),
   --vectors=100000,1000000 (default 100000), --hnsw=16:128,8:64, --no-local.

Run: python -m bench retrieval [flags]; python -m bench retrieval_search [flags] runs 3 alone.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench import retrieval_search
from libs.common import corpora
from libs.common.clients.retrieval import RetrievalClient
from services.retrieval.chunkers import CHUNKERS
from services.retrieval.embedders import load_tokenizer, packaged_minilm
from services.retrieval.tokens import LocalTokens
from tests.helpers.services import start_service

BATCH = 64
TEXTS = 256
REPEATS = 3
INGEST_CHUNKER = {"type": "recursive", "size": 256}


def passages() -> list[str]:
    """TEXTS paragraphs of Python's reference text, 200 to 1000 characters each."""
    out: list[str] = []
    for _, text in corpora.pydoc_topics():
        out.extend(p.strip() for p in text.split("\n\n") if 200 <= len(p.strip()) <= 1000)
    return out[:TEXTS]


def rate(embed, texts: list[str]) -> float:
    """Texts per second: the best of REPEATS passes over all batches (least disturbed by other load)."""
    rates = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        for i in range(0, len(texts), BATCH):
            embed(texts[i : i + BATCH])
        rates.append(len(texts) / (time.perf_counter() - start))
    return max(rates)


def embedding_throughput() -> None:
    from sentence_transformers import SentenceTransformer

    texts = passages()
    model = SentenceTransformer(str(packaged_minilm()), device="cpu")
    model.encode(texts[:BATCH], batch_size=BATCH)
    direct = rate(lambda batch: model.encode(batch, batch_size=BATCH, normalize_embeddings=True), texts)
    with tempfile.TemporaryDirectory() as home:
        service = start_service("retrieval", Path(home))
        try:
            client = RetrievalClient(service.address)
            client.embed(texts[:BATCH])  # loads the model
            served = rate(client.embed, texts)
            client.close()
        finally:
            service.stop()
    print(f"embedding, {len(texts)} passages in batches of {BATCH} (MiniLM-L6-v2, CPU):")
    print(f"  sentence-transformers direct {direct:8.1f} texts/s")
    print(f"  retrieval service (gRPC)     {served:8.1f} texts/s   ratio {served / direct:.2f} (target >= 0.8)")


def ingest_throughput() -> None:
    """Chunks embedded and indexed per second through the service (IngestCorpus over gRPC, into Qdrant
    Edge, with BM25 sparse vectors and the ingest journal) vs embedding the same chunks alone in-process."""
    from sentence_transformers import SentenceTransformer

    with tempfile.TemporaryDirectory() as home:
        folder = Path(home) / "artifacts" / "corpora" / "topics"
        folder.mkdir(parents=True)
        topics = list(corpora.pydoc_topics())
        for name, text in topics:
            (folder / f"{name}.txt").write_text(text)
        service = start_service("retrieval", Path(home))
        try:
            client = RetrievalClient(service.address)
            client.create("bench", sparse=True, chunker=INGEST_CHUNKER)
            client.embed(["warm up"], collection="bench")  # loads the model
            start = time.perf_counter()
            steps = list(client.ingest_corpus("bench", "corpora/topics", engine="local"))
            served = time.perf_counter() - start
            chunks = steps[-1].chunks_done
            client.close()
        finally:
            service.stop()
    splitter = CHUNKERS.create(INGEST_CHUNKER)
    tokens = LocalTokens(load_tokenizer(packaged_minilm()))
    texts = [c.text for _, text in topics for c in splitter.split(text, "text", tokens)]
    model = SentenceTransformer(str(packaged_minilm()), device="cpu")
    model.encode(texts[:BATCH], batch_size=BATCH)
    start = time.perf_counter()
    model.encode(texts, batch_size=BATCH, normalize_embeddings=True)
    alone = time.perf_counter() - start
    print(f"ingest, {len(topics)} reference-text documents, {chunks} chunks (recursive, 256 tokens, MiniLM + BM25):")
    print(f"  embedding alone, in-process            {len(texts) / alone:8.1f} chunks/s")
    print(f"  IngestCorpus end to end (Qdrant Edge)  {chunks / served:8.1f} chunks/s   "
          f"ratio {chunks / served / (len(texts) / alone):.2f}")  # fmt: skip


def main() -> None:
    embedding_throughput()
    ingest_throughput()
    retrieval_search.main()


if __name__ == "__main__":
    main()
