"""Packing token streams into fixed-length training sequences, written as numpy shards + a manifest.

Documents are concatenated, each followed by one EOS id, and the stream is cut every ``seq_len``
tokens, so a document may continue into the next sequence and no position is padding (the usual
causal-LM packing). Only the final partial sequence is either dropped or padded, by option.

Output, in ``out_dir``:

- ``shard_00000.npy``, ...: arrays of shape (sequences, seq_len), dtype uint16 when every id fits
  (vocab_size <= 65536), else uint32; 2 or 4 bytes per token.
- ``manifest.json``: the layout (seq_len, dtype, eos/pad ids, shard list) and counts. It is written
  last, so a directory with a manifest is complete.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from libs.common.errors import InvalidArgument
from services.training.dataprep.stage import require

MANIFEST = "manifest.json"
FORMAT = "llmp.packed.v1"


@dataclass
class PackConfig:
    """Shape and encoding of the packed sequences."""

    seq_len: int = 1024
    """Tokens per training sequence."""
    eos_id: int = 0
    """Id appended after every document."""
    vocab_size: int = 65536
    """Size of the tokeniser's vocabulary; picks uint16 (<= 65536) or uint32."""
    drop_last: bool = True
    """Drop the final partial sequence; when False it is padded with ``pad_id``."""
    pad_id: int | None = None
    """Id used to pad the final sequence (defaults to ``eos_id``)."""
    sequences_per_shard: int = 8192
    """Sequences per ``.npy`` file."""

    def __post_init__(self) -> None:
        require(self.seq_len >= 2, "must be >= 2", "seq_len")
        require(self.vocab_size >= 1, "must be >= 1", "vocab_size")
        require(self.vocab_size <= 2**32, "must be <= 2**32", "vocab_size")
        require(0 <= self.eos_id < self.vocab_size, "must be a valid id below vocab_size", "eos_id")
        require(self.pad_id is None or 0 <= self.pad_id < self.vocab_size, "must be < vocab_size", "pad_id")
        require(self.sequences_per_shard >= 1, "must be >= 1", "sequences_per_shard")

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint16 if self.vocab_size <= 2**16 else np.uint32)


@dataclass
class PackStats:
    """What packing produced."""

    documents: int = 0
    sequences: int = 0
    tokens_in: int = 0
    """Document tokens plus one EOS per document."""
    tokens_packed: int = 0
    """Tokens in the written sequences that came from documents (padding excluded)."""
    tokens_dropped: int = 0
    """Tokens of the final partial sequence when it was dropped."""
    pad_tokens: int = 0


class PackWriter:
    """Accepts token lists one document at a time and writes full shards as they fill."""

    def __init__(self, config: PackConfig, out_dir: Path | str) -> None:
        self.config = config
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.stats = PackStats()
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0
        self._shards: list[dict[str, Any]] = []

    def add(self, tokens: list[int]) -> None:
        ids = np.asarray([*tokens, self.config.eos_id], dtype=np.int64)
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise InvalidArgument(f"token id out of range [0, {self.config.vocab_size})", field="vocab_size")
        self._pending.append(ids.astype(self.config.dtype))
        self._pending_tokens += ids.size
        self.stats.documents += 1
        self.stats.tokens_in += ids.size
        shard_tokens = self.config.seq_len * self.config.sequences_per_shard
        while self._pending_tokens >= shard_tokens:
            self._write_sequences(self.config.sequences_per_shard)

    def close(self, extra: dict[str, Any] | None = None) -> PackStats:
        """Write the remaining full sequences, handle the tail, then the manifest (with ``extra`` added)."""
        full = self._pending_tokens // self.config.seq_len
        if full:
            self._write_sequences(full)
        tail = self._pending_tokens
        if tail and self.config.drop_last:
            self.stats.tokens_dropped = tail
        elif tail:
            pad_id = self.config.eos_id if self.config.pad_id is None else self.config.pad_id
            padding = np.full(self.config.seq_len - tail, pad_id, dtype=self.config.dtype)
            self._pending.append(padding)
            self.stats.pad_tokens = padding.size
            self._write_sequences(1)
        self._write_manifest(extra or {})
        return self.stats

    def _write_sequences(self, count: int) -> None:
        """Cut ``count`` sequences off the front of the pending stream into a new shard."""
        stream = np.concatenate(self._pending)
        used = count * self.config.seq_len
        shard = stream[:used].reshape(count, self.config.seq_len)
        name = f"shard_{len(self._shards):05d}.npy"
        np.save(self.out_dir / name, shard)
        self._shards.append({"file": name, "sequences": count})
        self._pending = [stream[used:]] if used < stream.size else []
        self._pending_tokens = stream.size - used
        self.stats.sequences += count
        self.stats.tokens_packed += used - self.stats.pad_tokens  # pad_tokens is non-zero only for the tail

    def _write_manifest(self, extra: dict[str, Any]) -> None:
        c = self.config
        manifest = {
            "format": FORMAT,
            "seq_len": c.seq_len,
            "dtype": c.dtype.name,
            "eos_id": c.eos_id,
            "pad_id": None if c.drop_last else (c.eos_id if c.pad_id is None else c.pad_id),
            "vocab_size": c.vocab_size,
            "shards": self._shards,
            "stats": asdict(self.stats),
            **extra,
        }
        (self.out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def load_packed(out_dir: Path | str) -> tuple[dict[str, Any], list[np.ndarray]]:
    """The manifest and the shards (memory-mapped, read-only) of a packed data set."""
    out_dir = Path(out_dir)
    manifest = json.loads((out_dir / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise InvalidArgument(f"not a packed data set (format {manifest.get('format')!r})", field="path")
    shards = [np.load(out_dir / shard["file"], mmap_mode="r") for shard in manifest["shards"]]
    return manifest, shards
