"""Unicode normalisation and whitespace clean-up.

NFC merges canonically equivalent sequences (``e`` + combining acute becomes ``é``) and is safe for
any text. NFKC also folds compatibility forms (full-width letters, ligatures, non-breaking spaces)
into their plain forms, which helps de-duplication and the tokeniser but changes how some text looks.
Indentation is kept by default because code is part of the corpus.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import ClassVar, Literal

from services.training.dataprep.stage import Document, DocumentStage, StageStats, require, with_text

FORMS = ("NFC", "NFKC", "none")

# C0/C1 control characters other than tab and newline, plus zero-width and BOM characters.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]")
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)
_INNER_SPACE = re.compile(r"[ \t]{2,}")


@dataclass
class NormalizeConfig:
    """How to normalise text before everything else looks at it."""

    form: Literal["NFC", "NFKC", "none"] = "NFC"
    """Unicode normalisation form: NFC, NFKC or none."""
    max_blank_lines: int = 2
    """Longer runs of blank lines are shortened to this many."""
    collapse_spaces: bool = False
    """Squeeze runs of spaces and tabs inside lines into one space (breaks code indentation)."""

    def __post_init__(self) -> None:
        require(self.form in FORMS, f"must be one of {FORMS}", "form")
        require(self.max_blank_lines >= 0, "must be >= 0", "max_blank_lines")


class NormalizeStage(DocumentStage):
    """Normalises Unicode and whitespace; drops documents left empty."""

    name: ClassVar[str] = "normalize"

    def __init__(self, config: NormalizeConfig) -> None:
        self.config = config

    def apply(self, doc: Document, stats: StageStats) -> Document | None:
        text = normalize_text(doc["text"], self.config)
        if not text:
            stats.drop("empty")
            return None
        return with_text(doc, text)


def normalize_text(text: str, config: NormalizeConfig) -> str:
    if config.form != "none":
        text = unicodedata.normalize(config.form, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _TRAILING_SPACE.sub("", text)
    if config.collapse_spaces:
        text = _INNER_SPACE.sub(" ", text)
    # max_blank_lines blank lines are max_blank_lines + 1 consecutive newlines.
    keep = config.max_blank_lines + 1
    text = re.sub(f"\n{{{keep + 1},}}", "\n" * keep, text)
    return text.strip("\n")
