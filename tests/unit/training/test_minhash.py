"""MinHash + LSH near-duplicate removal: estimate accuracy, band choice, and the stage on real text."""

from __future__ import annotations

import random

import numpy as np
import pytest

from libs.common.errors import InvalidArgument
from services.training.dataprep import (
    Document,
    MinHasher,
    NearDedupConfig,
    NearDedupStage,
    StageStats,
    estimate_jaccard,
    shingle_hashes,
)
from services.training.dataprep.minhash import PRIME, choose_bands


def exact_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return len(np.intersect1d(a, b)) / len(np.union1d(a, b))


def perturb(text: str, fraction: float, seed: int) -> str:
    """Replace ``fraction`` of the words with a marker word."""
    rng = random.Random(seed)
    words = text.split()
    for i in rng.sample(range(len(words)), int(fraction * len(words))):
        words[i] = "zzxq"
    return " ".join(words)


def test_shingles_ignore_case_and_spacing_and_stay_below_the_prime() -> None:
    a = shingle_hashes("The quick  brown fox\njumps over the lazy dog", "word", 3)
    b = shingle_hashes("the QUICK brown fox jumps over the lazy dog", "word", 3)
    assert np.array_equal(a, b)
    assert a.size == 7 and a.max() < PRIME
    assert shingle_hashes("tiny", "word", 5).size == 1
    assert shingle_hashes("  ", "char", 5).size == 0
    assert shingle_hashes("abcdef", "char", 3).size == 4


def test_signature_estimate_tracks_the_true_jaccard(topics: list[Document]) -> None:
    hasher = MinHasher(num_perm=256, seed=1)
    errors = []
    for i, doc in enumerate(topics[:12]):
        for fraction in (0.05, 0.2, 0.4):
            a = shingle_hashes(doc["text"], "word", 3)
            b = shingle_hashes(perturb(doc["text"], fraction, seed=i), "word", 3)
            errors.append(estimate_jaccard(hasher.signature(a), hasher.signature(b)) - exact_jaccard(a, b))
    errors = np.array(errors)
    # Standard error at k = 256 is at most 0.5 / 16 = 0.031; allow four of them for the worst case.
    assert np.abs(errors).max() < 0.125
    assert abs(errors.mean()) < 0.02  # unbiased
    assert np.sqrt((errors**2).mean()) < 0.04


def test_identical_sets_agree_everywhere_and_disjoint_sets_almost_nowhere() -> None:
    hasher = MinHasher(num_perm=128)
    a = np.arange(1000, dtype=np.uint64)
    assert estimate_jaccard(hasher.signature(a), hasher.signature(a.copy())) == 1.0
    assert estimate_jaccard(hasher.signature(a), hasher.signature(a + 10_000)) < 0.05


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 0.9])
def test_band_choice_finds_pairs_above_the_threshold_and_few_far_below(threshold: float) -> None:
    bands, rows = choose_bands(threshold, 128)
    assert bands * rows <= 128

    def candidate(j: float) -> float:  # P(some band identical | Jaccard j)
        return 1 - (1 - j**rows) ** bands

    assert candidate(min(threshold + 0.1, 1.0)) > 0.98
    assert candidate(threshold - 0.3) < 0.1


def test_near_copies_are_removed_and_distinct_documents_kept(topics: list[Document]) -> None:
    originals = [d for d in topics if len(d["text"]) > 2000][:20]
    near = [{"id": f"{d['id']}~", "text": perturb(d["text"], 0.01, seed=7)} for d in originals[:8]]
    for original, copy in zip(originals, near, strict=False):  # 1% of words changed: J of 5-grams ~ 0.9
        assert exact_jaccard(shingle_hashes(original["text"]), shingle_hashes(copy["text"])) > 0.85
    stage = NearDedupStage(NearDedupConfig(threshold=0.8))
    stats = StageStats(stage.name)
    kept = list(stage.run([*originals, *near], stats))
    assert [d["id"] for d in kept] == [d["id"] for d in originals]
    assert dict(stats.dropped) == {"near_duplicate": 8}


def test_documents_below_the_threshold_survive(topics: list[Document]) -> None:
    doc = max(topics, key=lambda d: len(d["text"]))
    far = {"id": "far", "text": perturb(doc["text"], 0.5, seed=3)}
    stage = NearDedupStage(NearDedupConfig(threshold=0.8))
    kept = list(stage.run([doc, far], StageStats(stage.name)))
    assert len(kept) == 2


def test_stdlib_modules_are_mostly_distinct(stdlib_docs: list[Document]) -> None:
    stage = NearDedupStage(NearDedupConfig(threshold=0.9))
    stats = StageStats(stage.name)
    kept = list(stage.run(stdlib_docs, stats))
    assert len(kept) >= 0.9 * len(stdlib_docs)


@pytest.mark.parametrize(("field", "value"), [("threshold", 0.0), ("num_perm", 2), ("shingle", "line")])
def test_bad_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(InvalidArgument, match=field):
        NearDedupConfig(**{field: value})
