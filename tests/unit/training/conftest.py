"""Real text for the data-preparation tests, a byte-level BPE tokeniser trained on it, and a real Redis."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from libs.common.corpora import pydoc_topics, stdlib_source
from services.training.dataprep import Document
from tests.helpers.redis_server import RedisServer
from tests.helpers.training import EOS


@pytest.fixture(scope="session")
def topics() -> list[Document]:
    """Python's English reference text, one document per topic (about 80)."""
    return [{"id": name, "text": text} for name, text in pydoc_topics()]


@pytest.fixture(scope="session")
def stdlib_docs() -> list[Document]:
    """The first 60 standard-library modules' source."""
    return [{"id": path, "text": text} for path, text in stdlib_source(limit=60)]


@pytest.fixture(scope="session")
def bpe(topics: list[Document]) -> Tokenizer:
    """A 600-token byte-level BPE with EOS as id 0, trained on the reference text."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator((doc["text"] for doc in topics[:30]), trainer)
    return tokenizer


@pytest.fixture(scope="session")
def encode_batch(bpe: Tokenizer):
    return lambda texts: [encoding.ids for encoding in bpe.encode_batch(texts)]


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A fresh redis-server with append-only persistence in its own directory."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()
