"""The layout of an uploaded corpus, shared by the service that writes it and the jobs that read it.

    corpora/<name>/
        part-00000.txt ...   UTF-8 text, documents separated by a blank line, shards of ~64 MiB
        manifest.json        {"documents": n, "bytes": n, "shards": {"part-00000.txt": [start, ...]}}

The shards are plain text, so a tokeniser trains on them as they are. A blank line cannot mark
where a document ends, since documents have blank lines of their own; the manifest records the
byte offset at which each document starts in its shard, and `documents` reads them back one by one.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
SEPARATOR = "\n\n"


def shard_name(index: int) -> str:
    return f"part-{index:05d}.txt"


def write_manifest(folder: Path, documents: int, size: int, starts: dict[str, list[int]]) -> None:
    (folder / MANIFEST).write_text(json.dumps({"documents": documents, "bytes": size, "shards": starts}))


def document_starts(shard: Path) -> list[int] | None:
    """Byte offsets of the documents in a shard of an uploaded corpus; None for any other file."""
    manifest = shard.parent / MANIFEST
    try:
        shards = _shards(str(manifest), manifest.stat().st_mtime_ns)
    except OSError:
        return None
    starts = shards.get(shard.name)
    return starts if isinstance(starts, list) and all(isinstance(s, int) for s in starts) else None


@functools.lru_cache(maxsize=8)
def _shards(manifest: str, mtime_ns: int) -> dict[str, Any]:
    """The manifest's "shards" table, read once for all the shards it lists; {} for another kind of manifest."""
    try:
        shards = json.loads(Path(manifest).read_text()).get("shards")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        return {}
    return shards if isinstance(shards, dict) else {}


def documents(data: bytes, starts: list[int]) -> Iterator[bytes]:
    """The documents of a shard's bytes, cut at their start offsets (each one's separator dropped)."""
    separator = SEPARATOR.encode()
    for i, start in enumerate(starts):
        end = starts[i + 1] - len(separator) if i + 1 < len(starts) else len(data)
        yield data[start:end]
