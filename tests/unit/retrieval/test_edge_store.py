"""Qdrant Edge as the vector store: index builds in a child process while serving, restarts,
crash leftovers, quantisation and payload indexes. Sizes are tiny; a low indexing threshold
makes the engine build HNSW graphs for them."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

from services.retrieval.edge_index import BUILD, CURRENT, OLD, SHARD, recover
from services.retrieval.edge_store import EdgeStore
from services.retrieval.vectorstores import Layout, Point

DIM = 16


def rows(n: int, seed: int = 0) -> np.ndarray:
    data = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return data / np.linalg.norm(data, axis=1, keepdims=True)


def pts(data: np.ndarray, first: int = 0) -> list[Point]:
    return [
        Point(str(uuid.UUID(int=first + i + 1)), v.tolist(), {"document_id": f"d{i % 5}"}) for i, v in enumerate(data)
    ]


def test_an_index_is_built_beside_the_serving_shard_and_keeps_every_write(tmp_path: Path) -> None:
    store = EdgeStore(str(tmp_path), index_threshold_kb=32)  # 32 KiB: 512 vectors of dim 16
    store.create("c", Layout(DIM, hnsw_m=8, ef_construct=32), {"k": 1})
    first, second = rows(1500), rows(700, seed=1)
    store.upsert("c", pts(first))  # starts a build
    store.upsert("c", pts(second, first=1500))  # lands during the build (op log) or after it
    assert store.count("c") == 2200  # searchable before any index exists
    store.wait_indexed("c")
    shard = store._shard("c")
    assert shard.builds >= 1 and store.info("c").indexed_vectors_count == 2200
    d1 = {"must": [{"key": "document_id", "match": {"value": "d1"}}]}
    assert store.count("c") == 2200 and store.count("c", d1) == 440
    for i in (0, 1499, 1500, 2199):  # each vector finds itself through the graph
        vector = (first[i] if i < 1500 else second[i - 1500]).tolist()
        assert store.dense("c", vector, 1, None)[0].id == str(uuid.UUID(int=i + 1))
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["collection.json", CURRENT, "indexed", shard.version]
    store.close()

    again = EdgeStore(str(tmp_path), index_threshold_kb=32)
    assert again.count("c") == 2200 and again.metadata("c") == {"k": 1}
    assert again._shard("c").builds == 0  # an indexed shard is not rebuilt on open
    assert again.dense("c", first[7].tolist(), 1, None)[0].id == str(uuid.UUID(int=8))
    assert again.drop("c") and again.names() == [] and not (tmp_path / "c").exists()
    again.close()


@pytest.mark.parametrize("quantization", ["scalar", "binary"])
def test_quantised_collections_search_and_rescore(tmp_path: Path, quantization: str) -> None:
    store = EdgeStore(str(tmp_path), index_threshold_kb=16)
    store.create("q", Layout(DIM, quantization=quantization), {})
    data = rows(600)
    store.upsert("q", pts(data))
    store.wait_indexed("q")
    assert store.info("q").indexed_vectors_count == 600
    exact = store.dense("q", data[3].tolist(), 5, None, exact=True)
    approximate = store.dense("q", data[3].tolist(), 5, None, hnsw_ef=64)
    assert approximate[0].id == exact[0].id == str(uuid.UUID(int=4))
    store.close()


def test_payload_indexes_cover_the_service_filters(tmp_path: Path) -> None:
    store = EdgeStore(str(tmp_path))
    store.create("c", Layout(DIM), {})
    assert set(store.info("c").payload_schema) == {"document_id", "ingest", "source", "kind"}
    store.close()


def test_leftovers_of_a_crash_are_settled(tmp_path: Path) -> None:
    store = EdgeStore(str(tmp_path))
    store.create("c", Layout(DIM), {})
    store.upsert("c", pts(rows(10)))
    store.close()
    folder = tmp_path / "c"
    (folder / SHARD).rename(folder / OLD)  # killed between the two renames of a swap
    (folder / BUILD).mkdir()
    (tmp_path / ".staging-dead").mkdir()  # killed while creating a collection
    recover(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["collection.json", SHARD]
    again = EdgeStore(str(tmp_path))
    assert again.count("c") == 10 and again.names() == ["c"] and not (tmp_path / ".staging-dead").exists()
    again.close()
