"""Retrieval service benchmarks, each against its reference measured in the same run.

1. Embedding throughput through the service (Embed over gRPC, the packaged all-MiniLM-L6-v2)
   vs sentence-transformers called in-process on the same texts and batches (target >= 0.8x).
2. Search on 100k vectors of dim 384 (a Gaussian mixture, built once): p50/p99 latency of the
   vector store's search, and its recall@10 against exact numpy search (target >= 0.95). The
   embedded Qdrant searches exactly; with LLMP_QDRANT_URL the same run measures a server's HNSW
   search against the same server's exact search.

Run: python -m bench retrieval
"""

from __future__ import annotations

import statistics
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from libs.common import corpora
from libs.common.clients.retrieval import RetrievalClient
from libs.common.settings import env
from services.retrieval.embedders import packaged_minilm
from services.retrieval.vectorstores import VECTORSTORES, Layout, Point
from tests.conftest import start_service

BATCH = 64
TEXTS = 256
REPEATS = 3
VECTORS = 100_000
DIM = 384
QUERIES = 200
K = 10


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


def mixture(n: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    rows = centres[rng.integers(0, len(centres), n)] + 0.35 * rng.standard_normal((n, DIM))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def search_latency() -> None:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((256, DIM)) / np.sqrt(DIM)
    data, queries = mixture(VECTORS, rng, centres), mixture(QUERIES, rng, centres)
    ids = [str(uuid.UUID(int=i + 1)) for i in range(VECTORS)]
    with tempfile.TemporaryDirectory() as tmp:
        store = VECTORSTORES.create({"type": "qdrant", "url": env("LLMP_QDRANT_URL"), "path": f"{tmp}/qdrant"})
        name = f"bench-{uuid.uuid4().hex[:8]}"
        start = time.perf_counter()
        store.create(name, Layout(DIM, hnsw_m=16, ef_construct=128), {})
        for i in range(0, VECTORS, 2000):
            store.upsert(name, [Point(ids[j], data[j].tolist(), {"n": j}) for j in range(i, min(i + 2000, VECTORS))])
        built = time.perf_counter() - start
        exact = np.argsort(-(queries @ data.T), axis=1)[:, :K]  # [QUERIES, K] cosine top-k
        server = bool(env("LLMP_QDRANT_URL"))
        runs = {"ann": False, "exact": True} if server else {"exact": True}
        measured = {}
        for label, brute in runs.items():
            latencies, recalls = [], []
            for q, truth in zip(queries, exact, strict=True):
                start = time.perf_counter()
                found = store.dense(name, q.tolist(), K, None, exact=brute)
                latencies.append((time.perf_counter() - start) * 1000)
                recalls.append(len({f.payload["n"] for f in found} & set(truth.tolist())) / K)
            measured[label] = (statistics.median(latencies), float(np.percentile(latencies, 99)), recalls)
        store.drop(name)
        store.close()
    where = "Qdrant server (HNSW m=16, ef_construct=128)" if server else "embedded Qdrant"
    print(f"search, {VECTORS} vectors of dim {DIM} in the {where}, built in {built:.0f}s, {QUERIES} queries:")
    for label, (p50, p99, recalls) in measured.items():
        what = "HNSW (ANN)" if label == "ann" else "exact (brute force)"
        print(f"  {what:20} top-{K} p50 {p50:7.1f} ms  p99 {p99:7.1f} ms  recall@{K} {statistics.mean(recalls):.3f}")
    if server:
        speedup = measured["exact"][0] / measured["ann"][0]
        print(f"  ANN recall@{K} {statistics.mean(measured['ann'][2]):.3f} (target >= 0.95), p50 {speedup:.1f}x exact")
    else:
        print("  the embedded engine always searches exactly; set LLMP_QDRANT_URL to measure HNSW recall")


def main() -> None:
    embedding_throughput()
    search_latency()


if __name__ == "__main__":
    main()
