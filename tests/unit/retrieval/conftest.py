"""A retrieval core over Qdrant Edge (the local default) in a temporary directory, with the packaged MiniLM."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.retrieval.core import RetrievalCore
from services.retrieval.embedders import load_tokenizer, packaged_minilm
from services.retrieval.tokens import LocalTokens
from tests.helpers.retrieval_core import make_core


@pytest.fixture(scope="session")
def minilm_tokens() -> LocalTokens:
    return LocalTokens(load_tokenizer(packaged_minilm()))


@pytest.fixture
def core(tmp_path: Path) -> Iterator[RetrievalCore]:
    c = make_core(tmp_path, max_document_bytes=20_000)
    yield c
    c.store.close()
