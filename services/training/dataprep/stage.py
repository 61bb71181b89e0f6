"""The parts every data-preparation stage shares: the document type, per-stage counts, the base classes.

A document is a plain dict, ``{"id": str, "text": str, "meta": {...}}`` (``meta`` optional), so it
crosses process boundaries (Ray Data, JSONL) unchanged. A stage is a small class built from a config
dataclass; it consumes an iterator of documents and yields the ones it keeps, recording in its
:class:`StageStats` how many came in, went out, were dropped (by reason) and were changed.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from libs.common.errors import InvalidArgument

Document = dict[str, Any]


@dataclass
class StageStats:
    """What one stage did to the stream."""

    name: str
    docs_in: int = 0
    docs_out: int = 0
    docs_changed: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    counts: Counter[str] = field(default_factory=Counter)
    """Stage-specific tallies, e.g. redactions per PII kind or tokens produced."""

    def drop(self, reason: str) -> None:
        self.dropped[reason] += 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "docs_in": self.docs_in,
            "docs_out": self.docs_out,
            "docs_changed": self.docs_changed,
            "dropped": dict(sorted(self.dropped.items())),
            "counts": dict(sorted(self.counts.items())),
        }


class Stage(ABC):
    """A step of the pipeline: documents in, kept documents out, counts in ``stats``."""

    name: ClassVar[str]
    requires_encoder: ClassVar[bool] = False
    """True for stages built with the tokeniser's ``encode_batch`` callable."""

    @abstractmethod
    def run(self, docs: Iterable[Document], stats: StageStats) -> Iterator[Document]: ...


class DocumentStage(Stage):
    """A stage that looks at one document at a time; subclasses implement :meth:`apply`."""

    def run(self, docs: Iterable[Document], stats: StageStats) -> Iterator[Document]:
        for doc in docs:
            stats.docs_in += 1
            kept = self.apply(doc, stats)
            if kept is None:
                continue
            if kept is not doc:
                stats.docs_changed += 1
            stats.docs_out += 1
            yield kept

    @abstractmethod
    def apply(self, doc: Document, stats: StageStats) -> Document | None:
        """The document to keep (the same object when unchanged), or None after ``stats.drop(reason)``."""


def with_text(doc: Document, text: str) -> Document:
    """``doc`` itself if its text is unchanged, else a copy carrying the new text."""
    return doc if text == doc["text"] else {**doc, "text": text}


ConfigT = TypeVar("ConfigT")


def parse_config(config_cls: type[ConfigT], params: dict[str, Any]) -> ConfigT:
    """Build a config dataclass from plain data, naming any unknown field."""
    known = {f.name for f in dataclasses.fields(config_cls)}  # type: ignore[arg-type]
    for key in params:
        if key not in known:
            raise InvalidArgument(f"unknown field; expected one of {sorted(known)}", field=key)
    try:
        return config_cls(**params)
    except TypeError as err:  # a value of the wrong type met a comparison in __post_init__
        raise InvalidArgument(f"a value has the wrong type ({err})") from err


@contextmanager
def field_prefix(prefix: str) -> Iterator[None]:
    """Re-raise InvalidArgument with its field placed under ``prefix`` (``stages[2]`` + ``threshold``)."""
    try:
        yield
    except InvalidArgument as err:
        message = err.message.removeprefix(f"{err.field}: ") if err.field else err.message
        raise InvalidArgument(message, field=f"{prefix}.{err.field}" if err.field else prefix) from err


def require(condition: bool, message: str, field_name: str) -> None:
    """Raise InvalidArgument naming ``field_name`` unless ``condition`` holds."""
    if not condition:
        raise InvalidArgument(message, field=field_name)
