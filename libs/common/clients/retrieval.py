"""Client of the retrieval service (`llmp.retrieval.v1`).

client = RetrievalClient()                                  # LLMP_RETRIEVAL_ADDRESS
client.create("docs", sparse=True)
client.ingest("docs", [pb.Document(id="a", text="...")])
hits = client.search("docs", "how do I ...", top_k=5, mode="hybrid")
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import grpc
from google.protobuf import struct_pb2
from llmp.retrieval.v1 import retrieval_pb2 as pb
from llmp.retrieval.v1 import retrieval_pb2_grpc as pb_grpc

from libs.common.rpc.client import address, channel
from libs.common.structs import to_struct


def struct(value: dict[str, Any] | None) -> struct_pb2.Struct | None:
    return None if value is None else to_struct(value)


class RetrievalClient:
    def __init__(self, target: str | None = None, ch: grpc.Channel | None = None) -> None:
        self.channel = ch or channel(target or address("retrieval"))
        self.stub = pb_grpc.RetrievalServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def embed(
        self, texts: list[str], embedder: dict[str, Any] | None = None, collection: str = ""
    ) -> list[list[float]]:
        reply = self.stub.Embed(pb.EmbedRequest(texts=texts, embedder=struct(embedder), collection=collection))
        return [list(v.values) for v in reply.vectors]

    def create(
        self,
        name: str,
        embedder: dict[str, Any] | None = None,
        chunker: dict[str, Any] | None = None,
        **options: Any,
    ) -> pb.CollectionInfo:
        return self.stub.CreateCollection(
            pb.CreateCollectionRequest(name=name, embedder=struct(embedder), chunker=struct(chunker), **options)
        )

    def describe(self, name: str) -> pb.CollectionInfo:
        return self.stub.DescribeCollection(pb.DescribeCollectionRequest(name=name))

    def list_collections(self) -> list[pb.CollectionInfo]:
        return list(self.stub.ListCollections(pb.ListCollectionsRequest()).collections)

    def delete(self, name: str) -> bool:
        return self.stub.DeleteCollection(pb.DeleteCollectionRequest(name=name)).deleted

    def ingest(
        self, collection: str, documents: Iterable[pb.Document], chunker: dict[str, Any] | None = None
    ) -> pb.IngestResponse:
        return self.stub.Ingest(
            pb.IngestRequest(collection=collection, documents=list(documents), chunker=struct(chunker))
        )

    def ingest_corpus(
        self, collection: str, path: str, patterns: Iterable[str] = (), chunker: dict[str, Any] | None = None,
        engine: str = "", batch_documents: int = 0,
    ) -> Iterator[pb.IngestProgress]:  # fmt: skip
        request = pb.IngestCorpusRequest(
            collection=collection, path=path, patterns=list(patterns), chunker=struct(chunker), engine=engine,
            batch_documents=batch_documents,
        )  # fmt: skip
        return iter(self.stub.IngestCorpus(request))

    def search(
        self, collection: str, query: str, top_k: int = 10, mode: str = "dense", filter: dict[str, Any] | None = None,
        **options: Any,
    ) -> list[pb.Hit]:  # fmt: skip
        request = pb.SearchRequest(
            collection=collection, query=query, top_k=top_k, mode=mode, filter=struct(filter), **options
        )
        return list(self.stub.Search(request).hits)

    def context(self, search: pb.SearchRequest, max_tokens: int = 1024, **options: Any) -> pb.BuildContextResponse:
        return self.stub.BuildContext(pb.BuildContextRequest(search=search, max_tokens=max_tokens, **options))
