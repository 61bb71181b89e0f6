"""Sources of documents: plain text files and JSON Lines.

Each reader yields documents lazily and counts what it could not use (undecodable files, bad JSON
lines, records without the text field) under the ``read`` stage of the report. The caller resolves
paths inside the artifact store before they reach here; configs only check that they exist.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from libs.common import corpus_shards
from services.training.dataprep.stage import Document, StageStats, parse_config, require


@dataclass
class TextFilesConfig:
    """Every file matching ``pattern`` under each path (a path may also name one file)."""

    paths: list[str] = field(default_factory=list)
    """Files or directories to read."""
    pattern: str = "**/*.txt"
    """Glob, relative to each directory, of the files to read."""
    encoding: str = "utf-8"
    """Text encoding; files that do not decode are skipped and counted."""

    def __post_init__(self) -> None:
        _require_paths(self.paths)


@dataclass
class JsonlConfig:
    """One document per line of each JSON Lines file."""

    paths: list[str] = field(default_factory=list)
    """JSONL files to read."""
    text_field: str = "text"
    """Key of the document text in each record."""
    id_field: str | None = "id"
    """Key of the document id; when absent the id is ``<file>:<line>``."""

    def __post_init__(self) -> None:
        _require_paths(self.paths)
        require(bool(self.text_field), "must not be empty", "text_field")


def _require_paths(paths: list[str]) -> None:
    require(bool(paths), "at least one path is required", "paths")
    missing = [p for p in paths if not Path(p).exists()]
    require(not missing, f"not found: {missing}", "paths")


def read_text_files(config: TextFilesConfig, stats: StageStats) -> Iterator[Document]:
    """Documents with the file's path (relative to its directory) as id and its contents as text.

    A shard of an uploaded corpus (libs/common/corpus_shards.py) holds many documents: each is one
    document of its own, with id ``<shard>#<n>``.
    """
    for root in map(Path, config.paths):
        files = (
            [(root, root.name)]
            if root.is_file()
            else [(p, str(p.relative_to(root))) for p in sorted(root.glob(config.pattern)) if p.is_file()]
        )
        for path, file_id in files:
            yield from _file_documents(path, file_id, config.encoding, stats)


def _file_documents(path: Path, file_id: str, encoding: str, stats: StageStats) -> Iterator[Document]:
    """The file as one document, or each document of an uploaded corpus's shard."""
    starts = corpus_shards.document_starts(path)
    try:
        data = path.read_bytes()
    except OSError:
        stats.docs_in += 1
        stats.drop("unreadable")
        return
    pieces = [data] if starts is None else corpus_shards.documents(data, starts)
    for n, piece in enumerate(pieces):
        stats.docs_in += 1
        try:
            text = piece.decode(encoding).replace("\r\n", "\n").replace("\r", "\n")  # as read_text does
        except UnicodeDecodeError:
            stats.drop("unreadable")
            continue
        stats.docs_out += 1
        yield {"id": file_id if starts is None else f"{file_id}#{n}", "text": text}


def read_jsonl(config: JsonlConfig, stats: StageStats) -> Iterator[Document]:
    """Documents from JSON records; other fields of each record are kept under ``meta``."""
    for path in map(Path, config.paths):
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                stats.docs_in += 1
                doc = _record_to_document(line, f"{path.name}:{number}", config, stats)
                if doc is not None:
                    stats.docs_out += 1
                    yield doc


def _record_to_document(line: str, fallback_id: str, config: JsonlConfig, stats: StageStats) -> Document | None:
    try:
        record: Any = json.loads(line)
    except json.JSONDecodeError:
        stats.drop("bad_json")
        return None
    if not isinstance(record, dict) or not isinstance(record.get(config.text_field), str):
        stats.drop("missing_text")
        return None
    text = record.pop(config.text_field)
    doc_id = record.pop(config.id_field, None) if config.id_field else None
    doc: Document = {"id": str(doc_id) if doc_id is not None else fallback_id, "text": text}
    if record:
        doc["meta"] = record
    return doc


SourceConfig = TextFilesConfig | JsonlConfig

SOURCES: dict[str, type[SourceConfig]] = {"text_files": TextFilesConfig, "jsonl": JsonlConfig}


def parse_source(spec: dict[str, Any]) -> SourceConfig:
    """The config of a source spec such as ``{"type": "jsonl", "paths": [...], "text_field": "body"}``."""
    params = dict(spec)
    kind = params.pop("type", None)
    require(kind in SOURCES, f"unknown source type {kind!r}; expected one of {sorted(SOURCES)}", "type")
    return parse_config(SOURCES[kind], params)


def read_documents(config: SourceConfig, stats: StageStats) -> Iterator[Document]:
    """Documents from the source ``config`` describes."""
    if isinstance(config, JsonlConfig):
        return read_jsonl(config, stats)
    return read_text_files(config, stats)
