"""Near-duplicate removal with MinHash signatures and locality-sensitive hashing (LSH).

Each document becomes a set of shingles (word or character n-grams), each hashed to an integer in
[0, P) with P = 2^32 - 5, the largest prime below 2^32. A MinHash signature keeps, for each of k
hash functions h_i(x) = (a_i * x + b_i) mod P (a universal family standing in for random
permutations), the smallest value over the set. Two signatures agree at a position with probability
equal to the sets' Jaccard similarity, so the fraction of agreeing positions estimates it with
standard error sqrt(J (1 - J) / k).

LSH cuts the signature into b bands of r rows; two documents become candidates when any band is
identical, which happens with probability 1 - (1 - J^r)^b: an S-curve whose steepest point sits
near (1/b)^(1/r). Every candidate is then checked against the full-signature estimate, so the band
shape only trades speed for recall. The first document of a near-duplicate cluster is kept.

All arithmetic stays exact in uint64: operands are below P < 2^32, so a * x + b < 2^64.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from services.training.dataprep.stage import Document, DocumentStage, StageStats, require

PRIME = np.uint64(4_294_967_291)  # 2**32 - 5
_ROLL_BASE = np.uint64(1_000_003)  # multiplier of the polynomial rolling hash over a shingle's items
_CHUNK = 4096  # shingles per step of the signature computation: bounds memory at k * 4096 * 8 bytes
_FALSE_POSITIVE_WEIGHT = 0.1  # of a wasted candidate check, against 0.9 for a missed duplicate
_WORD = re.compile(r"\w+")
_WHITESPACE = re.compile(r"\s+")

SHINGLE_KINDS = ("word", "char")


@dataclass
class NearDedupConfig:
    """How similar two documents must be to count as near-duplicates."""

    threshold: float = 0.8
    """Estimated Jaccard similarity of shingle sets at or above which a document is dropped."""
    num_perm: int = 128
    """Hash functions per signature (k); the estimate's standard error is sqrt(J (1 - J) / k)."""
    shingle: str = "word"
    """Shingle unit: word or char."""
    shingle_size: int = 5
    """Items per shingle (n of the n-gram)."""
    seed: int = 0
    """Seed of the hash family, so runs are reproducible."""

    def __post_init__(self) -> None:
        require(0.0 < self.threshold <= 1.0, "must be in (0, 1]", "threshold")
        require(8 <= self.num_perm <= 4096, "must be between 8 and 4096", "num_perm")
        require(self.shingle in SHINGLE_KINDS, f"must be one of {SHINGLE_KINDS}", "shingle")
        require(self.shingle_size >= 1, "must be >= 1", "shingle_size")


def shingle_hashes(text: str, kind: str = "word", size: int = 5) -> np.ndarray:
    """Distinct hashes, in [0, PRIME), of the text's shingles, shape (n_shingles,), dtype uint64.

    Case and whitespace are ignored. A text shorter than one shingle yields one shingle of all its
    items; a text with no items yields an empty array.
    """
    if kind == "word":
        words = _WORD.findall(text.casefold())
        items = np.fromiter((zlib.crc32(w.encode("utf-8")) for w in words), dtype=np.uint64, count=len(words))
    else:
        flat = _WHITESPACE.sub(" ", text.casefold()).strip()
        items = np.frombuffer(flat.encode("utf-32-le"), dtype="<u4").astype(np.uint64)
    if items.size == 0:
        return items
    items %= PRIME
    size = min(size, items.size)
    count = items.size - size + 1
    rolled = items[:count].copy()
    for offset in range(1, size):
        rolled = (rolled * _ROLL_BASE + items[offset : offset + count]) % PRIME
    return np.unique(rolled)


class MinHasher:
    """k hash functions (a_i x + b_i) mod P drawn once from a seed."""

    def __init__(self, num_perm: int = 128, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.num_perm = num_perm
        self._a = rng.integers(1, int(PRIME), size=(num_perm, 1), dtype=np.uint64)
        self._b = rng.integers(0, int(PRIME), size=(num_perm, 1), dtype=np.uint64)

    def signature(self, hashes: np.ndarray) -> np.ndarray:
        """The MinHash signature of a non-empty set of shingle hashes, shape (num_perm,), dtype uint32."""
        sig = np.full(self.num_perm, PRIME, dtype=np.uint64)
        for start in range(0, hashes.size, _CHUNK):
            chunk = hashes[None, start : start + _CHUNK]  # (1, c)
            sig = np.minimum(sig, ((self._a * chunk + self._b) % PRIME).min(axis=1))
        return sig.astype(np.uint32)


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Fraction of agreeing signature positions: an unbiased estimate of the sets' Jaccard similarity."""
    return float(np.mean(sig_a == sig_b))


def choose_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising the S-curve's weighted error area.

    The error is the probability of becoming a candidate below the threshold (a wasted signature
    check), integrated over similarity, plus that of being missed above it (a duplicate kept).
    Candidates are verified anyway, so misses weigh nine times more: at threshold 0.8 and 128
    hashes this picks 14 bands of 9 rows, which finds a pair at J = 0.9 with probability 0.999.
    """
    grid = np.linspace(0.0, 1.0, 501)
    below, above = grid <= threshold, grid >= threshold
    best, best_error = (1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        rows = num_perm // bands
        candidate = 1.0 - (1.0 - grid**rows) ** bands
        false_positive = np.trapezoid(candidate[below], grid[below])
        false_negative = np.trapezoid(1.0 - candidate[above], grid[above])
        error = _FALSE_POSITIVE_WEIGHT * false_positive + (1 - _FALSE_POSITIVE_WEIGHT) * false_negative
        if error < best_error:
            best, best_error = (bands, rows), float(error)
    return best


class LshIndex:
    """Signatures of kept documents, bucketed by band, answering "is there a near-duplicate?"."""

    def __init__(self, threshold: float, num_perm: int) -> None:
        self.threshold = threshold
        self.bands, self.rows = choose_bands(threshold, num_perm)
        self._buckets: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self._signatures: list[np.ndarray] = []

    def _band_keys(self, sig: np.ndarray) -> list[bytes]:
        return [sig[i * self.rows : (i + 1) * self.rows].tobytes() for i in range(self.bands)]

    def find_similar(self, sig: np.ndarray) -> int | None:
        """Index of a stored signature whose estimated similarity reaches the threshold, if any."""
        checked: set[int] = set()
        for bucket, key in zip(self._buckets, self._band_keys(sig), strict=True):
            for other in bucket.get(key, ()):
                if other in checked:
                    continue
                checked.add(other)
                if estimate_jaccard(sig, self._signatures[other]) >= self.threshold:
                    return other
        return None

    def add(self, sig: np.ndarray) -> int:
        index = len(self._signatures)
        self._signatures.append(sig)
        for bucket, key in zip(self._buckets, self._band_keys(sig), strict=True):
            bucket.setdefault(key, []).append(index)
        return index


class NearDedupStage(DocumentStage):
    """Drops documents whose shingle set is near one already kept."""

    name: ClassVar[str] = "near_dedup"

    def __init__(self, config: NearDedupConfig) -> None:
        self.config = config
        self._hasher = MinHasher(config.num_perm, config.seed)
        self._index = LshIndex(config.threshold, config.num_perm)

    def apply(self, doc: Document, stats: StageStats) -> Document | None:
        hashes = shingle_hashes(doc["text"], self.config.shingle, self.config.shingle_size)
        if hashes.size == 0:
            stats.counts["no_shingles"] += 1
            return doc
        sig = self._hasher.signature(hashes)
        if self._index.find_similar(sig) is not None:
            stats.drop("near_duplicate")
            return None
        self._index.add(sig)
        return doc
