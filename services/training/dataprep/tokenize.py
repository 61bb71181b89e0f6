"""Tokenisation through an ``encode_batch(texts) -> list[list[int]]`` callable.

The callable is whatever the training service wires in (the tokeniser service's client in
production, a local ``tokenizers.Tokenizer`` in tests); this stage only batches documents, attaches
the ids as ``doc["tokens"]`` and counts them. Special tokens (EOS) are the packer's business.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import ClassVar

from services.training.dataprep.stage import Document, Stage, StageStats, require

EncodeBatch = Callable[[list[str]], list[list[int]]]


@dataclass
class TokenizeConfig:
    """How documents are sent to the tokeniser."""

    batch_size: int = 64
    """Documents per ``encode_batch`` call."""

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, "must be >= 1", "batch_size")


class TokenizeStage(Stage):
    """Adds ``tokens`` (a list of ids) to each document; drops documents that encode to nothing."""

    name: ClassVar[str] = "tokenize"
    requires_encoder: ClassVar[bool] = True

    def __init__(self, config: TokenizeConfig, encode_batch: EncodeBatch) -> None:
        self.config = config
        self.encode_batch = encode_batch

    def run(self, docs: Iterable[Document], stats: StageStats) -> Iterator[Document]:
        stream = iter(docs)
        while batch := list(islice(stream, self.config.batch_size)):
            stats.docs_in += len(batch)
            encoded = self.encode_batch([doc["text"] for doc in batch])
            if len(encoded) != len(batch):
                raise RuntimeError(f"encode_batch returned {len(encoded)} results for {len(batch)} texts")
            for doc, ids in zip(batch, encoded, strict=True):
                if not ids:
                    stats.drop("no_tokens")
                    continue
                stats.counts["tokens"] += len(ids)
                stats.docs_out += 1
                stats.docs_changed += 1
                yield {**doc, "tokens": list(ids)}
