"""gRPC adapter of the retrieval core: proto in -> core call -> proto out, nothing else.

Blocking work (model inference, Qdrant calls) runs in worker threads so the event loop keeps
serving other calls; torch and numpy release the GIL while they compute.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import AsyncIterator
from typing import Any

from llmp.retrieval.v1 import retrieval_pb2 as pb
from llmp.retrieval.v1 import retrieval_pb2_grpc as pb_grpc

from libs.common.rpc.pools import run_blocking
from libs.common.structs import struct_field, to_struct
from services.retrieval import corpus
from services.retrieval.core import CollectionInfo, DocumentInput, Mmr, Query, RetrievalCore

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RetrievalService"].full_name


def info_pb(info: CollectionInfo) -> pb.CollectionInfo:
    spec = {k: v for k, v in info.spec.items() if v is not None}
    return pb.CollectionInfo(name=info.name, spec=to_struct(spec), dim=info.dim, points=info.points)


def query_of(request: pb.SearchRequest) -> Query:
    mmr = None
    if request.HasField("mmr"):
        mmr = Mmr(request.mmr.diversity, request.mmr.candidates)
    return Query(
        collection=request.collection,
        query=request.query,
        top_k=request.top_k or 10,
        mode=request.mode or "dense",
        filter=struct_field(request, "filter"),
        mmr=mmr,
        rrf_k=request.rrf_k,
    )


def document_of(d: pb.Document) -> DocumentInput:
    return DocumentInput(d.id, d.text, d.path, d.kind, d.source, struct_field(d, "metadata") or {})


class RetrievalServicer(pb_grpc.RetrievalServiceServicer):
    #: Methods that may take long (see libs/common/rpc/pools.py).
    SLOW_METHODS = frozenset({"CreateCollection", "Ingest", "IngestCorpus"})

    def __init__(self, core: RetrievalCore, ray_joined: bool = False) -> None:
        self.core = core
        self.ray_joined = ray_joined

    async def Embed(self, request: pb.EmbedRequest, context: Any) -> pb.EmbedResponse:
        vectors, tokens, name = await run_blocking(
            self.core.embed, list(request.texts), struct_field(request, "embedder"), request.collection
        )
        return pb.EmbedResponse(
            vectors=[pb.Vector(values=row) for row in vectors.tolist()],
            dim=vectors.shape[1],
            tokens=tokens,
            embedder=name,
        )

    async def CreateCollection(self, request: pb.CreateCollectionRequest, context: Any) -> pb.CollectionInfo:
        info = await run_blocking(
            self.core.create_collection,
            name=request.name,
            embedder=struct_field(request, "embedder"),
            distance=request.distance,
            hnsw_m=request.hnsw.m,
            ef_construct=request.hnsw.ef_construct,
            quantization=request.quantization,
            quantizer=request.quantizer,
            sparse=request.sparse,
            sparse_embedder=struct_field(request, "sparse_embedder"),
            chunker=struct_field(request, "chunker"),
            dim=request.dim,
        )
        return info_pb(info)

    async def ListCollections(self, request: pb.ListCollectionsRequest, context: Any) -> pb.ListCollectionsResponse:
        infos = await run_blocking(self.core.list_collections)
        return pb.ListCollectionsResponse(collections=[info_pb(i) for i in infos])

    async def DescribeCollection(self, request: pb.DescribeCollectionRequest, context: Any) -> pb.CollectionInfo:
        return info_pb(await run_blocking(self.core.describe, request.name))

    async def DeleteCollection(self, request: pb.DeleteCollectionRequest, context: Any) -> pb.DeleteCollectionResponse:
        return pb.DeleteCollectionResponse(deleted=await run_blocking(self.core.delete_collection, request.name))

    async def Ingest(self, request: pb.IngestRequest, context: Any) -> pb.IngestResponse:
        done = await run_blocking(
            self.core.ingest,
            request.collection,
            [document_of(d) for d in request.documents],
            struct_field(request, "chunker"),
        )
        return pb.IngestResponse(
            documents=[pb.IngestedDocument(**dataclasses.asdict(d)) for d in done],
            chunks=sum(d.chunks for d in done),
        )

    async def IngestCorpus(self, request: pb.IngestCorpusRequest, context: Any) -> AsyncIterator[pb.IngestProgress]:
        config = self.core.config
        documents = await run_blocking(
            corpus.list_corpus,
            self.core.artifacts,
            request.path,
            list(request.patterns),
            config.max_document_bytes,
            config.max_corpus_documents,
        )
        engine = corpus.choose_engine(request.engine, len(documents), config, self.ray_joined)
        stop = threading.Event()
        progress = corpus.ingest_corpus(
            self.core,
            request.collection,
            documents,
            struct_field(request, "chunker"),
            engine,
            request.batch_documents,
            stop.is_set,
        )
        try:
            while (step := await run_blocking(next, progress, None)) is not None:
                yield pb.IngestProgress(**dataclasses.asdict(step))
        finally:
            stop.set()  # a cancelled or disconnected call stops after the batch in hand

    async def DeleteDocuments(self, request: pb.DeleteDocumentsRequest, context: Any) -> pb.DeleteDocumentsResponse:
        chunks = await run_blocking(self.core.delete_documents, request.collection, list(request.ids))
        return pb.DeleteDocumentsResponse(chunks=chunks)

    async def Search(self, request: pb.SearchRequest, context: Any) -> pb.SearchResponse:
        hits = await run_blocking(self.core.search, query_of(request))
        return pb.SearchResponse(
            hits=[pb.Hit(**{**dataclasses.asdict(h), "metadata": to_struct(h.metadata)}) for h in hits]
        )

    async def BuildContext(self, request: pb.BuildContextRequest, context: Any) -> pb.BuildContextResponse:
        built = await run_blocking(
            self.core.build_context,
            query_of(request.search),
            request.max_tokens or 1024,
            request.tokenizer,
            request.template,
        )
        return pb.BuildContextResponse(
            prompt=built.prompt,
            citations=[pb.Citation(**dataclasses.asdict(c)) for c in built.citations],
            tokens=built.tokens,
            dropped=built.dropped,
        )
