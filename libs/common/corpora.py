"""Real text every machine has: the Python standard library's source and its English reference text.

Used by the demo, the tests and the benchmarks, since no data set can be downloaded.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from pathlib import Path


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(limit: int | None = None) -> list[Path]:
    """The standard library's .py files (site-packages excluded), in a stable order."""
    root = stdlib_root()
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)
    return files[:limit] if limit else files


def stdlib_source(limit: int | None = None) -> Iterator[tuple[str, str]]:
    """(relative path, source) for each readable UTF-8 file (about 13 MB in all)."""
    root = stdlib_root()
    for path in stdlib_files(limit):
        try:
            yield str(path.relative_to(root)), path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def pydoc_topics() -> Iterator[tuple[str, str]]:
    """(topic, text) of Python's English reference documentation (`pydoc_data.topics`)."""
    from pydoc_data.topics import topics

    yield from sorted(topics.items())


def _paragraphs(text: str, min_chars: int, max_chars: int) -> Iterator[str]:
    """Prose paragraphs of a topic: blank-line separated, mostly letters, within the size bounds."""
    for block in text.split("\n\n"):
        paragraph = " ".join(block.split())
        letters = sum(c.isalpha() or c.isspace() for c in paragraph)
        if min_chars <= len(paragraph) <= max_chars and letters >= 0.85 * len(paragraph):
            yield paragraph


def _split_first_sentence(paragraph: str) -> tuple[str, str] | None:
    head, dot, rest = paragraph.partition(". ")
    if not dot or len(head) < 20 or len(rest) < 40:
        return None
    return head + ".", rest


def instruction_pairs(max_chars: int = 600) -> list[dict[str, str]]:
    """Prompt/completion records from the reference text: a paragraph's first sentence -> the rest of it.

    The prompt names the topic and gives the opening sentence; the completion continues the
    paragraph. About 700 records, in a stable order.
    """
    records = []
    for topic, text in pydoc_topics():
        for paragraph in _paragraphs(text, 80, max_chars):
            split = _split_first_sentence(paragraph)
            if split:
                records.append(
                    {"prompt": f"Topic: {topic}\nBegin: {split[0]}\nContinue:", "completion": f" {split[1]}"}
                )
    return records

