"""How a request turns its sequences' logits into tokens: a decoding strategy per request.

The engine owns the batch (scheduler, cache, which sequence belongs to which request) and calls a
request's `Decoding` at two points: when one of its sequences has next-token logits (`append`),
and when one of them ends or is taken away from outside, e.g. aborted (`remove`). A strategy
changes the batch only through the narrow `DecodingHost` the engine passes in: emit a token into
a completion, end a completion, drop or fork a sequence, end the whole request. Sampling (here:
one sampler per completion, each completion one sequence) and beam search (beam.py: beams that
fork and die, the n best hypotheses reported at the end) are the two strategies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from libs.common.errors import LlmpError
from services.inference.engine.sampling import Sampler, SamplingContext, SamplingParams, TokenLogprob
from services.inference.engine.scheduler import Sequence


@dataclass
class CompletionOutput:
    """One of a request's n samples, as far as it got."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str | None = None
    """Decoded output, when the engine has a detokenizer; cut before a matched stop string."""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    """None while running, then "stop", "length" or "abort"."""
    new_token_ids: list[int] = field(default_factory=list)
    """Tokens generated since the previous output of this request."""
    num_draft_tokens: int = 0
    """Speculative decoding: tokens drafted for this sample so far."""
    num_accepted_tokens: int = 0
    """Speculative decoding: drafted tokens the target accepted."""


@dataclass(eq=False)
class RequestState:
    """A running request as the engine tracks it."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sequences: list[Sequence]
    """The sequences it started with (beam search forks more)."""
    samplers: list[Sampler]
    """One per completion when sampling; none for beam search."""
    completions: list[CompletionOutput]
    decoding: Decoding
    emitted: list[int]
    """Tokens of each completion already reported."""
    decoded: list[int]
    """Tokens of each completion that its `text` was decoded from."""
    unfinished: int
    """Completions without a finish reason."""
    error: LlmpError | None = None
    """Set when it failed; its sequences are aborted at the next step."""


class DecodingHost(Protocol):
    """What a strategy may do to the engine's batch."""

    def push(self, request: RequestState, index: int, seq: Sequence, token: int, logprob: TokenLogprob | None) -> bool:
        """Append a token to completion `index` (sequence `seq`); True if that ended the completion."""
        ...

    def end_completion(self, request: RequestState, index: int, seq: Sequence, reason: str, free: bool) -> None:
        """Completion `index`, whose sequence `seq` has left the request's map, ends; `free` its blocks."""
        ...

    def drop(self, seq: Sequence) -> None:
        """Take a sequence out of the batch and free its blocks."""
        ...

    def fork(self, request: RequestState, parent: Sequence, child: Sequence) -> None:
        """Add `child`, continuing `parent`'s computed tokens, to the batch as one of the request's sequences."""
        ...

    def end(self, request: RequestState, reasons: list[str], tokens: list[list[int]] | None = None) -> None:
        """The request is over: its completions get `reasons` (and `tokens`, when given)."""
        ...


class Decoding:
    """A request's strategy; the engine calls it under its lock, between forward passes."""

    def append(
        self, host: DecodingHost, request: RequestState, index: int, seq: Sequence, logits: torch.Tensor, argmax: int
    ) -> None:
        """Take sequence `seq`'s next-token logits [vocab] (`argmax` is their argmax, computed for the whole step)."""
        raise NotImplementedError

    def remove(
        self, host: DecodingHost, request: RequestState, index: int, seq: Sequence, reason: str, free: bool
    ) -> None:
        """Sequence `seq` (mapped to completion `index`) ends with `reason`; `free`: its blocks are still held."""
        raise NotImplementedError


class SampleDecoding(Decoding):
    """Each completion is one sequence drawing from its own sampler."""

    def append(
        self, host: DecodingHost, request: RequestState, index: int, seq: Sequence, logits: torch.Tensor, argmax: int
    ) -> None:
        sampler = request.samplers[index]
        if sampler.plain_greedy:
            host.push(request, index, seq, argmax, None)
            return
        token, logprob = sampler.sample(logits, SamplingContext(request.prompt_ids, seq.output_ids))
        host.push(request, index, seq, token, logprob)

    def remove(
        self, host: DecodingHost, request: RequestState, index: int, seq: Sequence, reason: str, free: bool
    ) -> None:
        host.end_completion(request, index, seq, reason, free)


SAMPLE = SampleDecoding()
"""Sampling keeps no state of its own (the samplers are the request's), so one instance serves all."""
