"""A third-party sampler plugin, as a package would ship one (the tests install it by entry point)."""

from __future__ import annotations

import math

import torch

from services.inference.engine.sampling import LogitsProcessor, SamplingContext


class BanTokens(LogitsProcessor):
    """Never pick the given token ids."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = torch.tensor(ids, dtype=torch.long)

    def __call__(self, logits: torch.Tensor, ctx: SamplingContext) -> torch.Tensor:
        return logits.index_fill(0, self.ids, -math.inf)
