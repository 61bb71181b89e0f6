"""Training corpora: uploaded into the artifact store, then read back and checked before training.

    corpora/<name>/
        part-00000.txt ...   UTF-8 text, documents separated by a blank line, shards of ~64 MiB
        manifest.json        {"documents": n, "bytes": n, "shards": {shard: [each document's byte offset]}}

(libs/common/corpus_shards.py: the training jobs read the documents back one by one.)

A corpus reference is a corpus name, or a file or folder path relative to the store root.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from libs.common.artifacts import ArtifactStore, check_name
from libs.common.corpus_shards import MANIFEST, SEPARATOR, shard_name, write_manifest
from libs.common.errors import AlreadyExists, InvalidArgument, NotFound

KIND = "corpora"
SHARD_BYTES = 64 << 20


@dataclass
class CorpusStats:
    files: list[Path]
    bytes: int = 0
    alphabet: set[str] = field(default_factory=set)


class _ShardWriter:
    """Appends documents to part-NNNNN.txt files, starting a new shard past SHARD_BYTES, and records
    where each document starts."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.bytes = self.documents = self._shard_bytes = self._index = 0
        self.starts: dict[str, list[int]] = {shard_name(0): []}
        self._fh = open(folder / shard_name(0), "w", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, text: str, new_document: bool) -> None:
        if new_document or self.documents == 0:
            if self._shard_bytes > SHARD_BYTES:
                self._fh.close()
                self._index += 1
                self._shard_bytes = 0
                self.starts[shard_name(self._index)] = []
                self._fh = open(self.folder / shard_name(self._index), "w", encoding="utf-8")  # noqa: SIM115
            elif self.documents:
                self._fh.write(SEPARATOR)
                self._shard_bytes += len(SEPARATOR)
            self.starts[shard_name(self._index)].append(self._shard_bytes)
            self.documents += 1
        size = len(text.encode())
        self._fh.write(text)
        self._shard_bytes += size
        self.bytes += size

    def close(self) -> None:
        self._fh.close()


async def upload(store: ArtifactStore, chunks: AsyncIterator[tuple[str, str, bool]]) -> tuple[str, int, int]:
    """Write (name, text, new_document) chunks as a new corpus; returns (name, bytes, documents).

    Nothing is visible in the store until the last chunk has arrived and been written; a stream
    that fails or is cancelled half-way leaves nothing behind.
    """
    stream = aiter(chunks)
    try:
        name, text, _ = await anext(stream)
    except StopAsyncIteration:
        raise InvalidArgument("no chunks received", field="corpus") from None
    check_name(name, "name")
    if store.path(f"{KIND}/{name}").exists():
        raise AlreadyExists(f"corpus {name!r} exists; delete it or choose another name", field="name")
    with store.staging(f"{KIND}/{name}") as tmp:
        writer = _ShardWriter(tmp)
        try:
            writer.write(text, new_document=True)
            async for _, text, new_document in stream:
                writer.write(text, new_document)
        finally:
            writer.close()
        if writer.bytes == 0:
            raise InvalidArgument("the corpus is empty", field="corpus")
        write_manifest(tmp, writer.documents, writer.bytes, writer.starts)
    return name, writer.bytes, writer.documents


def resolve(store: ArtifactStore, refs: Iterable[str]) -> list[Path]:
    """Corpus names or store-relative paths -> the text files they hold."""
    files: list[Path] = []
    for i, ref in enumerate(refs):
        where = f"corpus[{i}]"
        if not ref.strip("/"):
            raise InvalidArgument("an empty reference; name a corpus or a path in the artifact store", field=where)
        corpus_dir = store.path(f"{KIND}/{ref}", field=where)  # refuses overlong and escaping names first
        path = corpus_dir if "/" not in ref and corpus_dir.is_dir() else store.path(ref, field=where)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST)
        elif path.is_file():
            found = [path]
        else:
            raise NotFound(f"no corpus or file {ref!r} in the artifact store", field=where)
        if not found:
            raise InvalidArgument(f"{ref!r} holds no files", field=where)
        files.extend(found)
    return files


def check(store: ArtifactStore, files: list[Path], texts: list[str], alphabet: bool = True) -> CorpusStats:
    """Read every file once: refuse invalid UTF-8 and an empty corpus; collect the alphabet if asked
    (byte-level algorithms need none, and skipping it saves a pass over every character)."""
    stats = CorpusStats(files=files)
    for path in files:
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidArgument(
                f"{store.relative(path)} is not valid UTF-8 (byte {e.start}: {data[e.start : e.start + 4]!r})",
                field="corpus",
            ) from None
        stats.bytes += len(data)
        if alphabet or not stats.alphabet:
            stats.alphabet.update(text if alphabet else text[:4096])
    for text in texts:
        stats.bytes += len(text.encode())
        stats.alphabet.update(text)
    stats.alphabet -= {" ", "\n", "\t", "\r"}
    if not files and not texts:
        raise InvalidArgument("give corpus references or texts to train on", field="corpus")
    if stats.bytes == 0 or not stats.alphabet:
        raise InvalidArgument("the corpus is empty", field="corpus")
    return stats
