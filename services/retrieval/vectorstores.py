"""Vector stores as plugins (group `llmp.vectorstores`): one interface, three backends.

- `qdrant_edge` (services/retrieval/edge_store.py), the local default: Qdrant's own engine
  in-process (`qdrant-edge-py`), one shard per collection under LLMP_HOME/qdrant_edge, with HNSW,
  quantisation, payload indexes, the IDF modifier, fusion and MMR done by the engine.
- `qdrant` with `url`: a Qdrant server through qdrant-client (LLMP_QDRANT_URL).
- `qdrant` with `path`: qdrant-client's local mode, a pure-Python stand-in that searches exactly
  and ignores HNSW and quantisation; kept for comparison (benchmarks, congruence tests).

Names that begin with "_" (which users cannot choose) hold the service's own records and are not
listed. A collection holds one named dense vector ("dense"), optionally one sparse vector
("sparse", with Qdrant's IDF modifier) per chunk, and its creation spec as collection metadata,
so a restarted service finds everything it needs in the store itself. Filters are Qdrant's JSON
filters, checked by qdrant-client's models for every backend.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
from qdrant_client import QdrantClient, models

from libs.common.errors import InvalidArgument, NotFound
from libs.common.plugins import Registry
from services.retrieval.embedders import SparseVector
from services.retrieval.ranking import RRF_K, mmr, rrf

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


#: Quantised copies a collection can keep beside its float32 vectors.
QUANTIZERS = ("scalar", "binary")


@dataclass(frozen=True)
class Layout:
    """How a collection is stored."""

    dim: int
    distance: str = "cosine"
    hnsw_m: int = 0  # 0: the engine's default (16)
    ef_construct: int = 0  # 0: the engine's default (100)
    #: False/"": none; True or "scalar": int8 per dimension; "binary": one bit per dimension.
    quantization: bool | str = False
    sparse: bool = False
    #: Payload fields that get a keyword index: those the service's own filters use.
    keyword_fields: tuple[str, ...] = ("document_id", "ingest", "source", "kind")

    @property
    def quantizer(self) -> str:
        return "scalar" if self.quantization is True else str(self.quantization or "")


@dataclass(frozen=True)
class Search:
    """One retrieval: dense and/or sparse, fused by reciprocal rank when both, optionally MMR-reranked."""

    limit: int
    dense: Sequence[float] | None = None  # searched when given
    sparse: SparseVector | None = None  # searched when given
    filter: dict[str, Any] | None = None
    rrf_k: int = RRF_K
    #: MMR diversity in [0, 1] (None: no MMR): `candidates` hits reranked against `mmr_vector`.
    mmr: float | None = None
    candidates: int = 0
    mmr_vector: Sequence[float] | None = None

    @property
    def fetch(self) -> int:
        """Hits each search fetches: the candidates MMR chooses from, else the limit."""
        return max(self.limit, self.candidates or 4 * self.limit) if self.mmr is not None else self.limit


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
        self,
        name: str,
        vector: Sequence[float],
        limit: int,
        filter: dict[str, Any] | None,
        exact: bool = False,
        hnsw_ef: int = 0,
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

    def search(self, name: str, s: Search) -> list[Found]:
        """Dense, sparse or both fused by RRF, then MMR: here in Python; an engine that can does it itself."""
        dense = self.dense(name, s.dense, s.fetch, s.filter) if s.dense is not None else []
        found = dense
        if s.sparse is not None:
            sparse = self.sparse(name, s.sparse, s.fetch, s.filter)
            found = sparse
            if s.dense is not None:
                by_id = {f.id: f for f in [*sparse, *dense]}
                fused = rrf([[f.id for f in dense], [f.id for f in sparse]], s.rrf_k)
                found = [Found(str(i), score, by_id[str(i)].payload) for i, score in fused[: s.fetch]]
        if s.mmr is not None and found and s.mmr_vector is not None:
            stored = self.vectors(name, [f.id for f in found])
            rows = np.array([stored[f.id] for f in found])
            found = [found[i] for i in mmr(np.asarray(s.mmr_vector), rows, s.limit, s.mmr)]
        return found[: s.limit]


def parse_filter(raw: dict[str, Any] | None) -> models.Filter | None:
    if not raw:
        return None
    try:
        return models.Filter.model_validate(raw)
    except pydantic.ValidationError as e:
        problem = e.errors()[0]
        where = ".".join(str(p) for p in problem["loc"])
        raise InvalidArgument(f"not a Qdrant filter: {where}: {problem['msg']}", field="filter") from None


QUANTIZATION: dict[str, models.QuantizationConfig | None] = {
    "": None,
    "scalar": models.ScalarQuantization(
        scalar=models.ScalarQuantizationConfig(type=models.ScalarType.INT8, always_ram=True)
    ),
    "binary": models.BinaryQuantization(binary=models.BinaryQuantizationConfig(always_ram=True)),
}


class QdrantStore(VectorStore):
    """qdrant-client: a Qdrant server (`url`) or the client's local mode (`path`)."""

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
        quantization = QUANTIZATION[layout.quantizer]
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
        if not self.local:  # local mode has no payload indexes
            for field in layout.keyword_fields:
                self._call("create_payload_index", name, field, models.PayloadSchemaType.KEYWORD)

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
        self,
        name: str,
        vector: Sequence[float],
        limit: int,
        filter: dict[str, Any] | None,
        exact: bool = False,
        hnsw_ef: int = 0,
    ) -> list[Found]:
        reply = self._call(
            "query_points",
            name,
            query=list(vector),
            using=DENSE,
            limit=limit,
            query_filter=parse_filter(filter),
            search_params=models.SearchParams(exact=exact, hnsw_ef=hnsw_ef or None),
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
    "vectorstores",
    {
        "qdrant_edge": "services.retrieval.edge_store:EdgeStore",
        "qdrant": "services.retrieval.vectorstores:QdrantStore",
    },
    base=VectorStore,
)
