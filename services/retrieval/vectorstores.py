"""Vector stores as plugins (group `llmp.vectorstores`); the built-in is Qdrant through qdrant-client.

`qdrant` is embedded on disk (qdrant-client's local mode, one client per directory: this service
owns it) unless `url` names a Qdrant server (LLMP_QDRANT_URL); both run the same calls. Names that
begin with "_" (which users cannot choose) hold the service's own records and are not listed. A
collection holds one named dense vector ("dense"), optionally one sparse vector ("sparse", with
Qdrant's IDF modifier) per chunk, and its creation spec as collection metadata, so a restarted
service finds everything it needs in the store itself. Local mode searches exactly (no HNSW);
the HNSW and quantisation settings take effect on a server.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic
from qdrant_client import QdrantClient, models

from libs.common.errors import InvalidArgument, NotFound
from libs.common.plugins import Registry
from services.retrieval.embedders import SparseVector

DENSE, SPARSE = "dense", "sparse"
DISTANCES = {
    "cosine": models.Distance.COSINE,
    "dot": models.Distance.DOT,
    "euclid": models.Distance.EUCLID,
    "manhattan": models.Distance.MANHATTAN,
}


@dataclass(frozen=True)
class Point:
    id: str
    vector: list[float]
    payload: dict[str, Any]
    sparse: SparseVector | None = None


@dataclass(frozen=True)
class Found:
    id: str
    score: float
    payload: dict[str, Any]


@dataclass(frozen=True)
class Layout:
    """How a collection is stored."""

    dim: int
    distance: str = "cosine"
    hnsw_m: int = 0
    ef_construct: int = 0
    quantization: bool = False
    sparse: bool = False


class VectorStore(abc.ABC):
    """One interface over a local and a remote backend; every method is one store operation."""

    @abc.abstractmethod
    def create(self, name: str, layout: Layout, metadata: dict[str, Any]) -> None: ...
    @abc.abstractmethod
    def exists(self, name: str) -> bool: ...
    @abc.abstractmethod
    def names(self) -> list[str]: ...
    @abc.abstractmethod
    def metadata(self, name: str) -> dict[str, Any]: ...
    @abc.abstractmethod
    def count(self, name: str, filter: dict[str, Any] | None = None) -> int: ...
    @abc.abstractmethod
    def drop(self, name: str) -> bool: ...
    @abc.abstractmethod
    def upsert(self, name: str, points: Sequence[Point]) -> None: ...
    @abc.abstractmethod
    def delete(self, name: str, filter: dict[str, Any]) -> int: ...
    @abc.abstractmethod
    def dense(
        self, name: str, vector: Sequence[float], limit: int, filter: dict[str, Any] | None, exact: bool = False
    ) -> list[Found]: ...
    @abc.abstractmethod
    def sparse(self, name: str, vector: SparseVector, limit: int, filter: dict[str, Any] | None) -> list[Found]: ...
    @abc.abstractmethod
    def vectors(self, name: str, ids: Sequence[str]) -> dict[str, list[float]]: ...
    # A table of small records (no vectors), for the service's own bookkeeping such as the ingest journal.
    @abc.abstractmethod
    def put_record(self, table: str, id: str, payload: dict[str, Any]) -> None: ...
    @abc.abstractmethod
    def drop_record(self, table: str, id: str) -> None: ...
    @abc.abstractmethod
    def records(self, table: str) -> dict[str, dict[str, Any]]: ...
    @abc.abstractmethod
    def close(self) -> None: ...


def parse_filter(raw: dict[str, Any] | None) -> models.Filter | None:
    if not raw:
        return None
    try:
        return models.Filter.model_validate(raw)
    except pydantic.ValidationError as e:
        problem = e.errors()[0]
        where = ".".join(str(p) for p in problem["loc"])
        raise InvalidArgument(f"not a Qdrant filter: {where}: {problem['msg']}", field="filter") from None


class QdrantStore(VectorStore):
    def __init__(self, url: str = "", path: str = "") -> None:
        if not url and not path:
            raise ValueError("needs a server url or a local path")
        if url:
            self.client = QdrantClient(url=url)
        else:
            Path(path).mkdir(parents=True, exist_ok=True)
            self.client = QdrantClient(path=path)
        self.local = not url
        # Local mode is not safe for concurrent calls; a server is.
        self._lock: threading.Lock | None = threading.Lock() if self.local else None

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self._lock is None:
            return getattr(self.client, method)(*args, **kwargs)
        with self._lock:
            return getattr(self.client, method)(*args, **kwargs)

    def create(self, name: str, layout: Layout, metadata: dict[str, Any]) -> None:
        hnsw = models.HnswConfigDiff(m=layout.hnsw_m or None, ef_construct=layout.ef_construct or None)
        quantization = (
            models.ScalarQuantization(
                scalar=models.ScalarQuantizationConfig(type=models.ScalarType.INT8, always_ram=True)
            )
            if layout.quantization
            else None
        )
        self._call(
            "create_collection",
            name,
            vectors_config={DENSE: models.VectorParams(size=layout.dim, distance=DISTANCES[layout.distance])},
            sparse_vectors_config={SPARSE: models.SparseVectorParams(modifier=models.Modifier.IDF)}
            if layout.sparse
            else None,
            hnsw_config=hnsw,
            quantization_config=quantization,
            metadata=metadata,
        )
        if not self.local:
            self._call("create_payload_index", name, "document_id", models.PayloadSchemaType.KEYWORD)

    def exists(self, name: str) -> bool:
        return bool(self._call("collection_exists", name))

    def names(self) -> list[str]:
        return sorted(c.name for c in self._call("get_collections").collections if c.name[0] != "_")

    def _info(self, name: str) -> models.CollectionInfo:
        if not self.exists(name):
            raise NotFound(f"no collection named {name!r}", field="collection")
        return self._call("get_collection", name)

    def metadata(self, name: str) -> dict[str, Any]:
        return dict(self._info(name).config.metadata or {})

    def count(self, name: str, filter: dict[str, Any] | None = None) -> int:
        return int(self._call("count", name, count_filter=parse_filter(filter), exact=True).count)

    def drop(self, name: str) -> bool:
        return bool(self._call("delete_collection", name))

    def upsert(self, name: str, points: Sequence[Point]) -> None:
        structs = []
        for p in points:
            vectors: dict[str, Any] = {DENSE: p.vector}
            if p.sparse:
                vectors[SPARSE] = models.SparseVector(indices=p.sparse.indices, values=p.sparse.values)
            structs.append(models.PointStruct(id=p.id, vector=vectors, payload=p.payload))
        self._call("upsert", name, structs, wait=True)

    def delete(self, name: str, filter: dict[str, Any]) -> int:
        doomed = self.count(name, filter)
        if doomed:
            self._call("delete", name, models.FilterSelector(filter=models.Filter.model_validate(filter)), wait=True)
        return doomed

    @staticmethod
    def _found(points: Sequence[models.ScoredPoint]) -> list[Found]:
        return [Found(str(p.id), float(p.score), dict(p.payload or {})) for p in points]

    def dense(
        self, name: str, vector: Sequence[float], limit: int, filter: dict[str, Any] | None, exact: bool = False
    ) -> list[Found]:
        reply = self._call(
            "query_points",
            name,
            query=list(vector),
            using=DENSE,
            limit=limit,
            query_filter=parse_filter(filter),
            search_params=models.SearchParams(exact=exact),
            with_payload=True,
        )
        return self._found(reply.points)

    def sparse(self, name: str, vector: SparseVector, limit: int, filter: dict[str, Any] | None) -> list[Found]:
        if not vector.indices:
            return []
        reply = self._call(
            "query_points",
            name,
            query=models.SparseVector(indices=vector.indices, values=vector.values),
            using=SPARSE,
            limit=limit,
            query_filter=parse_filter(filter),
            with_payload=True,
        )
        return self._found(reply.points)

    def vectors(self, name: str, ids: Sequence[str]) -> dict[str, list[float]]:
        records = self._call("retrieve", name, list(ids), with_payload=False, with_vectors=[DENSE])
        return {str(r.id): r.vector[DENSE] for r in records}

    def put_record(self, table: str, id: str, payload: dict[str, Any]) -> None:
        if not self._call("collection_exists", table):
            self._call("create_collection", table, vectors_config={})
        self._call("upsert", table, [models.PointStruct(id=id, vector={}, payload=payload)], wait=True)

    def drop_record(self, table: str, id: str) -> None:
        if self._call("collection_exists", table):
            self._call("delete", table, models.PointIdsList(points=[id]), wait=True)

    def records(self, table: str) -> dict[str, dict[str, Any]]:
        if not self._call("collection_exists", table):
            return {}
        found: dict[str, dict[str, Any]] = {}
        offset = None
        while True:
            batch, offset = self._call("scroll", table, limit=256, offset=offset, with_payload=True)
            found.update({str(r.id): dict(r.payload or {}) for r in batch})
            if offset is None:
                return found

    def close(self) -> None:
        self._call("close")


VECTORSTORES: Registry[VectorStore] = Registry(
    "vectorstores", {"qdrant": "services.retrieval.vectorstores:QdrantStore"}, base=VectorStore
)
