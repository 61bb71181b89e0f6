"""Result fusion and diversification: reciprocal-rank fusion and maximal marginal relevance.

Both work on ids and plain arrays, so they behave the same whichever vector store found the hits.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

RRF_K = 60


def rrf(rankings: Sequence[Sequence[Hashable]], k: int = RRF_K) -> list[tuple[Hashable, float]]:
    """Fuse ranked id lists: score(id) = sum over lists of 1 / (k + rank), rank from 1; best first.

    Ties keep the order in which ids were first seen, so the fusion is deterministic.
    """
    scores: dict[Hashable, float] = {}
    for ranking in rankings:
        for rank, key in enumerate(ranking, start=1):
            scores[key] = scores.get(key, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda item: -item[1])


def mmr(query: np.ndarray, candidates: np.ndarray, k: int, diversity: float) -> list[int]:
    """Pick `k` candidate rows by maximal marginal relevance; returns their indices in pick order.

    query: [dim], candidates: [n, dim]. Each pick maximises
    (1 - diversity) * cos(query, c) - diversity * max cos(c, already picked).
    """
    if not len(candidates):
        return []
    rows = candidates / np.maximum(np.linalg.norm(candidates, axis=1, keepdims=True), 1e-12)
    q = query / max(float(np.linalg.norm(query)), 1e-12)
    relevance = rows @ q  # [n]
    similarity = rows @ rows.T  # [n, n]
    picked: list[int] = []
    redundancy = np.full(len(rows), -np.inf)
    for _ in range(min(k, len(rows))):
        penalty = np.where(np.isinf(redundancy), 0.0, redundancy)
        score = (1 - diversity) * relevance - diversity * penalty
        score[picked] = -np.inf
        best = int(np.argmax(score))
        picked.append(best)
        redundancy = np.maximum(redundancy, similarity[best])
    return picked
