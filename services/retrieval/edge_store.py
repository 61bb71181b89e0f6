"""The local default vector store: Qdrant Edge (`qdrant-edge-py`), Qdrant's engine in-process.

Layout under `path` (LLMP_HOME/qdrant_edge):

    <collection>/collection.json   the layout and the creation spec (the collection's metadata)
    <collection>/shard/            the Edge shard: write-ahead log, segments, indexes
    <collection>/shard-<n>/        the shard after its n-th index build; `current` names it (edge_index.py)
    .staging-*/, .trash-*/         a collection being created or dropped

A collection appears by renaming its finished staging folder into place and disappears by
renaming it to trash, so a crash never leaves half a collection; `__init__` sweeps both kinds
away. Each shard has a write-ahead log, so every update that returned survives a killed
process. Collections are opened on first use and stay open (one writer per folder: the
engine locks the log). HNSW graphs and quantised vectors are built in a child process while
the shard keeps serving (edge_index.py). Record tables ("_" names) are shards whose points
carry only a payload.

Searches run in the engine end to end: filters (edge_filters.py), the IDF modifier of the
sparse vector, reciprocal-rank fusion of dense and sparse hits, and MMR.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, cast

import qdrant_edge as qe

from libs.common.errors import AlreadyExists, InvalidArgument, NotFound
from services.retrieval.edge_filters import edge_filter
from services.retrieval.edge_index import SHARD, LiveShard
from services.retrieval.embedders import SparseVector
from services.retrieval.vectorstores import DENSE, SPARSE, Found, Layout, Point, Search, VectorStore, parse_filter

SPEC = "collection.json"
DISTANCES = {
    "cosine": qe.Distance.Cosine,
    "dot": qe.Distance.Dot,
    "euclid": qe.Distance.Euclid,
    "manhattan": qe.Distance.Manhattan,
}
QUANTIZATION: dict[str, Any] = {
    "": lambda: None,
    "scalar": lambda: qe.ScalarQuantizationConfig(qe.ScalarType.Int8, always_ram=True),
    "binary": lambda: qe.BinaryQuantizationConfig(always_ram=True),
}
# Quantised vectors are searched first, then the best `oversampling` x limit rescored exactly.
OVERSAMPLING = {"": 1.0, "scalar": 1.0, "binary": 3.0}
HNSW_DEFAULTS = (16, 100)  # Qdrant's m and ef_construct
RRF_TIE = 1e-5  # relative; RRF scores are ~1/60, float32 resolves ~1e-7 of that
RECORDS_VECTOR = "none"  # record tables need one vector kind to exist; their points have none


def _filter(raw: dict[str, Any] | None) -> qe.Filter | None:
    return edge_filter(parse_filter(raw))


def _found(points: Sequence[qe.ScoredPoint]) -> list[Found]:
    return [Found(str(p.id), float(p.score), dict(p.payload or {})) for p in points]


def _scroll(shard: qe.EdgeShard, request: qe.ScrollRequest) -> tuple[list[qe.Record], Any]:
    return shard.scroll(request)


def _sparse(vector: SparseVector) -> qe.SparseVector:
    return qe.SparseVector(list(vector.indices), list(vector.values))


class EdgeStore(VectorStore):
    def __init__(self, path: str, index_threshold_kb: int = 10_000, build_index: bool = True) -> None:
        """`index_threshold_kb`: vectors written (KiB) that start an HNSW build; `build_index`: build at all."""
        self.root = Path(path)
        self.root.mkdir(parents=True, exist_ok=True)
        self.threshold_kb = index_threshold_kb
        self.build_index = build_index
        self._open: dict[str, LiveShard] = {}
        self._layouts: dict[str, Layout] = {}
        self._lock = threading.Lock()  # the open table, creates and drops
        for leftover in self.root.glob(".*"):
            shutil.rmtree(leftover, ignore_errors=True)

    # -- collections -------------------------------------------------------------------------
    def _config(self, layout: Layout) -> qe.EdgeConfig:
        m, ef_construct = layout.hnsw_m or HNSW_DEFAULTS[0], layout.ef_construct or HNSW_DEFAULTS[1]
        return qe.EdgeConfig(
            vectors={DENSE: qe.EdgeVectorParams(size=layout.dim, distance=DISTANCES[layout.distance])},
            sparse_vectors={SPARSE: qe.EdgeSparseVectorParams(modifier=qe.Modifier.Idf)} if layout.sparse else None,
            hnsw_config=qe.HnswIndexConfig(m=m, ef_construct=ef_construct, full_scan_threshold=self.threshold_kb),
            quantization_config=QUANTIZATION[layout.quantizer](),
            optimizers=qe.EdgeOptimizersConfig(indexing_threshold=self.threshold_kb),
        )

    def _make(self, name: str, config: qe.EdgeConfig, spec: dict[str, Any], keyword_fields: Sequence[str]) -> None:
        """Build the collection in a staging folder, then rename it into place (the commit)."""
        staging = self.root / f".staging-{uuid.uuid4().hex}"
        shard = qe.EdgeShard.create(str(staging / SHARD), config)
        try:
            for field in keyword_fields:
                shard.update(qe.UpdateOperation.create_field_index(field, qe.PayloadSchemaType.Keyword))
        finally:
            shard.close()
        (staging / SPEC).write_text(json.dumps(spec))
        os.rename(staging, self.root / name)

    def create(self, name: str, layout: Layout, metadata: dict[str, Any]) -> None:
        with self._lock:
            if self.exists(name):
                raise AlreadyExists(f"collection {name!r} already exists", field="name")
            self._make(
                name, self._config(layout), {"layout": asdict(layout), "metadata": metadata}, layout.keyword_fields
            )

    def exists(self, name: str) -> bool:
        return (self.root / name / SPEC).is_file()

    def names(self) -> list[str]:
        return sorted(p.parent.name for p in self.root.glob(f"*/{SPEC}") if p.parent.name[0] not in "_.")

    def _spec(self, name: str) -> dict[str, Any]:
        if not self.exists(name):
            raise NotFound(f"no collection named {name!r}", field="collection")
        return dict(json.loads((self.root / name / SPEC).read_text()))

    def metadata(self, name: str) -> dict[str, Any]:
        return dict(self._spec(name)["metadata"])

    def _layout(self, name: str) -> Layout:
        if name not in self._layouts:
            raw = self._spec(name)["layout"]
            self._layouts[name] = Layout(**{**raw, "keyword_fields": tuple(raw["keyword_fields"])})
        return self._layouts[name]

    def _shard(self, name: str) -> LiveShard:
        with self._lock:
            if name not in self._open:
                layout = self._layout(name)
                vector_kb = layout.dim * 4 / 1024  # float32 dense vector per point
                build = self.build_index and name[0] != "_"
                self._open[name] = LiveShard(self.root / name, self.threshold_kb, vector_kb, build)
            return self._open[name]

    def drop(self, name: str) -> bool:
        with self._lock:
            if not self.exists(name):
                return False
            shard = self._open.pop(name, None)
            self._layouts.pop(name, None)
            if shard is not None:
                shard.close()
            trash = self.root / f".trash-{uuid.uuid4().hex}"
            os.rename(self.root / name, trash)
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def wait_indexed(self, name: str) -> None:
        """Block until the collection's index builds are done (benchmarks and tests)."""
        self._shard(name).wait_built()

    def info(self, name: str) -> qe.ShardInfo:
        return self._shard(name).read(lambda s: s.info())

    # -- points ------------------------------------------------------------------------------
    def count(self, name: str, filter: dict[str, Any] | None = None) -> int:
        request = qe.CountRequest(exact=True, filter=_filter(filter))
        return int(self._shard(name).read(lambda s: s.count(request)))

    def upsert(self, name: str, points: Sequence[Point]) -> None:
        structs = []
        for p in points:
            vectors: dict[str, Any] = {DENSE: list(p.vector)}
            if p.sparse:
                vectors[SPARSE] = _sparse(p.sparse)
            structs.append(qe.Point(p.id, vectors, p.payload))
        self._shard(name).update(qe.UpdateOperation.upsert_points(structs), len(structs))

    def delete(self, name: str, filter: dict[str, Any]) -> int:
        shard, condition = self._shard(name), _filter(filter)
        if condition is None:
            raise InvalidArgument("a delete needs a filter", field="filter")
        with shard.write_lock:  # the count and the delete see the same points
            doomed = int(shard.read(lambda s: s.count(qe.CountRequest(exact=True, filter=condition))))
        if doomed:
            shard.update(qe.UpdateOperation.delete_points_by_filter(condition))
        return doomed

    def vectors(self, name: str, ids: Sequence[str]) -> dict[str, list[float]]:
        records = self._shard(name).read(lambda s: s.retrieve(list(ids), with_payload=False, with_vector=[DENSE]))
        # Named vectors come back as {name: vector}; the stubs' union also allows a plain list.
        return {str(r.id): list(cast(dict[str, list[float]], r.vector)[DENSE]) for r in records}

    # -- search ------------------------------------------------------------------------------
    def _params(self, name: str, exact: bool = False, hnsw_ef: int = 0) -> qe.SearchParams:
        quantizer = self._layout(name).quantizer
        quantization = (
            qe.QuantizationSearchParams(rescore=True, oversampling=OVERSAMPLING[quantizer]) if quantizer else None
        )
        return qe.SearchParams(hnsw_ef=hnsw_ef or None, exact=exact, quantization=quantization)

    def _query(self, name: str, request: qe.QueryRequest) -> list[Found]:
        return _found(self._shard(name).read(lambda s: s.query(request)))

    def dense(
        self,
        name: str,
        vector: Sequence[float],
        limit: int,
        filter: dict[str, Any] | None,
        exact: bool = False,
        hnsw_ef: int = 0,
    ) -> list[Found]:
        query = qe.Query.Nearest(list(vector), using=DENSE)
        params = self._params(name, exact, hnsw_ef)
        return self._query(
            name, qe.QueryRequest(limit, query=query, filter=_filter(filter), params=params, with_payload=True)
        )

    def sparse(self, name: str, vector: SparseVector, limit: int, filter: dict[str, Any] | None) -> list[Found]:
        if not vector.indices:
            return []
        query = qe.Query.Nearest(_sparse(vector), using=SPARSE)
        return self._query(name, qe.QueryRequest(limit, query=query, filter=_filter(filter), with_payload=True))

    def search(self, name: str, s: Search) -> list[Found]:
        """One engine query: nearest dense or sparse, RRF over both as prefetches, MMR on top."""
        condition, fetch = _filter(s.filter), s.fetch
        sparse = s.sparse if s.sparse is not None and s.sparse.indices else None
        if s.dense is None and sparse is None:
            return []
        stages = []
        if s.dense is not None:
            stages.append(
                qe.Prefetch(
                    fetch, qe.Query.Nearest(list(s.dense), using=DENSE), params=self._params(name), filter=condition
                )
            )
        if sparse is not None:
            stages.append(qe.Prefetch(fetch, qe.Query.Nearest(_sparse(sparse), using=SPARSE), filter=condition))
        if len(stages) == 2:
            # The engine ranks from 0 (1 / (k + position)); ranking.rrf from 1: k + 1 gives the same scores.
            # A dense weight a hair above 1 breaks ties as ranking.rrf does: the dense list's hit first.
            fusion: Any = qe.Fusion.Rrf(k=s.rrf_k + 1, weights=[1.0 + RRF_TIE, 1.0])  # stubs omit the nested class
            stages = [qe.Prefetch(fetch, fusion, prefetches=stages, filter=condition)]
        if s.mmr is not None and s.mmr_vector is not None:
            # The engine's lambda weighs relevance: 1 - diversity.
            final: Any = qe.Mmr(list(s.mmr_vector), 1.0 - s.mmr, fetch, using=DENSE)
            request = qe.QueryRequest(s.limit, query=final, prefetches=stages, filter=condition, with_payload=True)
            return self._query(name, request)
        (stage,) = stages
        request = qe.QueryRequest(
            s.limit, query=stage.query, prefetches=stage.prefetches or None, filter=condition,
            params=stage.params, with_payload=True,
        )  # fmt: skip
        return self._query(name, request)

    # -- records -----------------------------------------------------------------------------
    def _table(self, table: str) -> LiveShard:
        with self._lock:
            if not self.exists(table):
                config = qe.EdgeConfig(sparse_vectors={RECORDS_VECTOR: qe.EdgeSparseVectorParams()})
                self._make(table, config, {"layout": asdict(Layout(dim=0, keyword_fields=())), "metadata": {}}, ())
        return self._shard(table)

    def put_record(self, table: str, id: str, payload: dict[str, Any]) -> None:
        self._table(table).update(qe.UpdateOperation.upsert_points([qe.Point(id, {}, payload)]))

    def drop_record(self, table: str, id: str) -> None:
        if self.exists(table):
            self._shard(table).update(qe.UpdateOperation.delete_points([id]))

    def records(self, table: str) -> dict[str, dict[str, Any]]:
        if not self.exists(table):
            return {}
        shard, found, offset = self._shard(table), {}, None
        while True:
            request = qe.ScrollRequest(offset=offset, limit=256, with_payload=True)
            batch, offset = shard.read(partial(_scroll, request=request))
            found.update({str(r.id): dict(r.payload or {}) for r in batch})
            if offset is None:
                return found

    def close(self) -> None:
        with self._lock:
            shards, self._open = list(self._open.values()), {}
        for shard in shards:
            shard.close()
