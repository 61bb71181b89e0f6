"""Settings of the retrieval service (section `retrieval` of the config file, LLMP_RETRIEVAL_*)."""

from __future__ import annotations

from dataclasses import dataclass

from libs.common.config import ServiceConfig, doc


@dataclass
class RetrievalConfig(ServiceConfig):
    port: int = doc("gRPC port", 50052)
    metrics_port: int = doc("Prometheus port; -1 turns metrics off", 51052)
    max_batch: int = doc("most texts in one Embed call or documents in one Ingest call", 1024)
    max_document_bytes: int = doc("largest single document (UTF-8 bytes)", 8 << 20)
    max_top_k: int = doc("most hits one search returns", 1000)
    embedder_cache: int = doc("embedders kept loaded in memory", 4)
    max_chunk_tokens: int = doc("largest chunk size a chunker spec may ask for (tokens)", 8192)
    max_chunks_per_document: int = doc("most chunks one document may be split into", 4096)
    max_ingest_chunks: int = doc("most chunks one Ingest call (or corpus batch) embeds", 16384)
    max_mmr_candidates: int = doc("most hits a search fetches to rerank with MMR", 1000)
    ingest_batch: int = doc("documents chunked and embedded together", 64)
    max_corpus_documents: int = doc("most documents one corpus ingest takes", 1_000_000)
    ray: str = doc("Ray for corpus ingests: auto (join RAY_ADDRESS when set), local, off", "auto")
    ray_min_documents: int = doc("corpus size for Ray Data in 'auto'", 2000)
    ray_workers: int = doc("most Ray Data actors chunking and embedding one corpus", 2)
    vectorstore: str = doc(
        "embedded store without LLMP_QDRANT_URL: qdrant_edge, or qdrant (qdrant-client's local mode)",
        "qdrant_edge",
    )
    index_threshold_kb: int = doc("vectors written (KiB) that start an HNSW build", 10_000)
    fault_point: str = doc("test hook: the process kills itself at this ingest step (after_journal, after_upsert)", "")
