"""Heuristic quality filters in the spirit of the Gopher and C4 rules.

Each rule is a cheap statistic of the text compared with a bound; a document is dropped at the first
rule it fails, and the report counts drops per rule. A bound set to None turns its rule off.

The language rule is a heuristic, not a language identifier: English prose is dense in function
words ("the", "of", "and", ...), so the share of words found in a short stop-word list separates it
from code, tables, boilerplate and most other languages. It misjudges very short texts (hence a
minimum word count below which the rule abstains), and English text heavy in names or numbers, and
it knows no language but English. Measured on the corpora at hand: the English reference text of
``pydoc_data.topics`` scores 0.33-0.45 (a few very short topics 0.2-0.3), Python source mostly
0.1-0.3, French or German prose about 0; hence the default bound of 0.3.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

from services.training.dataprep.stage import Document, DocumentStage, StageStats, require

_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")  # letters, with an inner apostrophe ("don't")
_LETTER = re.compile(r"[^\W\d_]")
_SPACE = re.compile(r"\s")

# Function words of English (a common short list); they are about 40% of the words of English prose.
_STOP_WORDS_TEXT = """
    a about above after again against all am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have
    having he her here hers herself him himself his how i if in into is it its itself just me more most
    my myself no nor not now of off on once only or other our ours ourselves out over own same she should
    so some such than that the their theirs them themselves then there these they this those through to
    too under until up very was we were what when where which while who whom why will with would you
    your yours yourself yourselves
"""
ENGLISH_STOP_WORDS = frozenset(_STOP_WORDS_TEXT.split())


@dataclass
class QualityConfig:
    """Bounds on simple text statistics; None disables a rule."""

    min_chars: int | None = 50
    """Fewest characters a document may have."""
    max_chars: int | None = 1_000_000
    """Most characters a document may have."""
    max_symbol_word_ratio: float | None = 0.1
    """Most occurrences of `symbols` per word."""
    symbols: tuple[str, ...] = ("#", "...", "\u2026")
    """Strings counted by the symbol rule (hash marks and ellipses, as in Gopher)."""
    min_alpha_fraction: float | None = 0.5
    """Least fraction of non-whitespace characters that are letters."""
    max_repeated_line_fraction: float | None = 0.3
    """Most fraction of non-blank lines that repeat an earlier line of the same document."""
    language: str | None = None
    """Keep only this language ("en"), judged by the stop-word heuristic; None keeps all."""
    min_stopword_ratio: float = 0.3
    """Least share of words that are English stop words for a document to count as English."""
    min_words_for_language: int = 20
    """Documents with fewer words are not judged by the language rule."""

    def __post_init__(self) -> None:
        self.symbols = tuple(self.symbols)
        require(self.language in (None, "en"), "only 'en' (or null) is supported", "language")
        for name in ("max_symbol_word_ratio", "min_alpha_fraction", "max_repeated_line_fraction"):
            value = getattr(self, name)
            require(value is None or value >= 0, "must be >= 0", name)
        for name in ("min_alpha_fraction", "max_repeated_line_fraction", "min_stopword_ratio"):
            value = getattr(self, name)
            require(value is None or value <= 1, "must be <= 1", name)
        if self.min_chars is not None and self.max_chars is not None:
            require(self.min_chars <= self.max_chars, "must not exceed max_chars", "min_chars")


class QualityStage(DocumentStage):
    """Drops documents that fail a rule, counting drops by the rule's name."""

    name: ClassVar[str] = "quality"

    def __init__(self, config: QualityConfig) -> None:
        self.config = config

    def apply(self, doc: Document, stats: StageStats) -> Document | None:
        reason = failed_rule(doc["text"], self.config)
        if reason is not None:
            stats.drop(reason)
            return None
        return doc


def failed_rule(text: str, config: QualityConfig) -> str | None:
    """The name of the first rule ``text`` fails, or None when it passes them all."""
    c = config
    words = _WORD.findall(text)
    checks = (
        ("too_short", c.min_chars is not None and len(text) < c.min_chars),
        ("too_long", c.max_chars is not None and len(text) > c.max_chars),
        (
            "symbol_ratio",
            c.max_symbol_word_ratio is not None and symbol_word_ratio(text, words, c.symbols) > c.max_symbol_word_ratio,
        ),
        ("alpha_fraction", c.min_alpha_fraction is not None and alpha_fraction(text) < c.min_alpha_fraction),
        (
            "repeated_lines",
            c.max_repeated_line_fraction is not None and repeated_line_fraction(text) > c.max_repeated_line_fraction,
        ),
        (
            "language",
            c.language == "en"
            and len(words) >= c.min_words_for_language
            and stopword_ratio(words) < c.min_stopword_ratio,
        ),
    )
    return next((name for name, failed in checks if failed), None)


def symbol_word_ratio(text: str, words: list[str], symbols: tuple[str, ...]) -> float:
    hits = sum(text.count(symbol) for symbol in symbols)
    return hits / max(len(words), 1)


def alpha_fraction(text: str) -> float:
    visible = len(text) - len(_SPACE.findall(text))
    return len(_LETTER.findall(text)) / max(visible, 1)


def repeated_line_fraction(text: str) -> float:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    repeats = sum(n - 1 for n in Counter(lines).values())
    return repeats / max(len(lines), 1)


def stopword_ratio(words: list[str]) -> float:
    return sum(w.lower() in ENGLISH_STOP_WORDS for w in words) / max(len(words), 1)
