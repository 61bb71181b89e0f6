"""Reciprocal-rank fusion and maximal marginal relevance on hand-checked inputs."""

from __future__ import annotations

import numpy as np
import pytest

from services.retrieval.ranking import mmr, rrf


def test_rrf_sums_reciprocal_ranks() -> None:
    fused = dict(rrf([["a", "b", "c"], ["c", "a"]], k=60))
    assert fused["a"] == pytest.approx(1 / 61 + 1 / 62)
    assert fused["c"] == pytest.approx(1 / 63 + 1 / 61)
    assert fused["b"] == pytest.approx(1 / 62)
    assert [key for key, _ in rrf([["a", "b", "c"], ["c", "a"]])] == ["a", "c", "b"]


def test_rrf_of_one_list_keeps_its_order() -> None:
    assert [key for key, _ in rrf([["x", "y", "z"]])] == ["x", "y", "z"]


def test_mmr_without_diversity_is_relevance_order() -> None:
    query = np.array([1.0, 0.0])
    rows = np.array([[0.6, 0.8], [1.0, 0.0], [0.9, 0.1]])
    assert mmr(query, rows, 3, diversity=0.0) == [1, 2, 0]


def test_mmr_skips_near_duplicates() -> None:
    query = np.array([1.0, 0.0, 0.0])
    rows = np.array([[1.0, 0.0, 0.0], [0.99, 0.01, 0.0], [0.7, 0.0, 0.7]])
    assert mmr(query, rows, 2, diversity=0.0) == [0, 1]
    assert mmr(query, rows, 2, diversity=0.6) == [0, 2]


def test_mmr_on_nothing() -> None:
    assert mmr(np.ones(3), np.zeros((0, 3)), 5, 0.5) == []
