"""What one engine step computes: a chunk of tokens per scheduled sequence.

The type every layer of a step shares, so it lives below them all: the scheduler makes the
chunks, the speculator appends drafted tokens to them, the model runner computes them. Plain
data, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepChunk:
    """Tokens of one sequence to compute this step, starting at cache position `start`."""

    seq_id: str
    token_ids: list[int]
    start: int
    sample: bool
    """Whether the logits of the chunk's last token are wanted (the chunk ends the known tokens)."""
    num_logits: int = 1
    """How many of the chunk's last tokens have their logits returned when `sample` is set
    (1 + the drafted tokens when speculative decoding verifies a draft)."""
