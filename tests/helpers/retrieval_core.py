"""A retrieval core over Qdrant Edge (the local default) in a folder, as the retrieval unit tests drive it."""

from __future__ import annotations

from pathlib import Path

from libs.common.artifacts import ArtifactStore
from services.retrieval.config import RetrievalConfig
from services.retrieval.core import RetrievalCore
from services.retrieval.edge_store import EdgeStore


def make_core(root: Path, **config: int) -> RetrievalCore:
    store = EdgeStore(str(root / "qdrant_edge"))
    return RetrievalCore(RetrievalConfig(**config), ArtifactStore(root / "artifacts"), store)
