"""Exact de-duplication: keep the first document of each distinct (normalised) text.

The key is a 128-bit BLAKE2b digest of the text after case folding and collapsing all whitespace,
so copies that differ only in case, spacing or line breaks count as one. Memory is 16 bytes per
distinct document plus set overhead (about 100 bytes each in CPython).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import ClassVar

from services.training.dataprep.stage import Document, DocumentStage, StageStats

_WHITESPACE = re.compile(r"\s+")


@dataclass
class ExactDedupConfig:
    """What counts as the same text."""

    casefold: bool = True
    """Ignore case when comparing."""
    ignore_whitespace: bool = True
    """Treat any run of whitespace as one space and ignore leading/trailing whitespace."""


class ExactDedupStage(DocumentStage):
    """Drops every document whose key was seen before."""

    name: ClassVar[str] = "exact_dedup"

    def __init__(self, config: ExactDedupConfig) -> None:
        self.config = config
        self._seen: set[bytes] = set()

    def apply(self, doc: Document, stats: StageStats) -> Document | None:
        digest = text_key(doc["text"], self.config)
        if digest in self._seen:
            stats.drop("exact_duplicate")
            return None
        self._seen.add(digest)
        return doc


def text_key(text: str, config: ExactDedupConfig) -> bytes:
    if config.ignore_whitespace:
        text = _WHITESPACE.sub(" ", text).strip()
    if config.casefold:
        text = text.casefold()
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
