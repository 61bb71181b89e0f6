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
