"""Speculative decoding: a drafter guesses k tokens, the target checks them all in one forward pass.

Each step, every sequence whose chunk ends in a sample (a decode, or the last chunk of a prompt)
asks the drafter (plugin kind "drafters", entry-point group `llmp.drafters`; built-ins in
drafters.py) for up to k tokens. They are appended to the sequence's chunk, so the target's
ordinary packed forward over the paged cache returns the logits of the k + 1 positions at once.
`rejection_sample` then keeps draft i with probability min(1, p_i(d_i) / q_i(d_i)), draws a
replacement from norm(max(0, p_i - q_i)) at the first rejection, and a bonus token from p_{k+1}
when all are kept: the emitted tokens follow the target's distribution p exactly, whatever the
drafter proposes (Leviathan et al. 2023; Chen et al. 2023). p is the request's own sampling
pipeline applied to the target's logits, so at temperature 0 p is one-hot and the output is
token-identical to plain decoding. A drafter without a distribution (n-gram lookup) proposes
point masses: q = 1 at its token.

The cache: a chunk with drafts writes KV for all of them. Only the accepted ones count as
computed afterwards; the slots of rejected drafts lie beyond the sequence's computed length,
so they are never read, never registered in the prefix cache, and the next step overwrites them
in place (the blocks stay with the sequence, which grows into them).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from libs.common.artifacts import ArtifactStore
from libs.common.errors import InvalidArgument
from libs.common.plugins import Registry
from services.inference.engine.batch import StepChunk
from services.inference.engine.kv_cache import KVCache
from services.inference.engine.sampling import Sampler, SamplingContext


@dataclass(frozen=True)
class DraftRequest:
    """One sequence asking for a draft."""

    seq_id: str
    token_ids: list[int]
    """Every known token; the last one is not in the target's cache yet."""
    max_tokens: int
    """Tokens to draft at most."""
    sampler: Sampler
    """The sequence's pipeline and random generator: a model drafter samples with them."""
    context: SamplingContext


@dataclass(frozen=True)
class Draft:
    token_ids: list[int]  # [k]
    probs: torch.Tensor | None
    """[k, vocab] the distributions the tokens were drawn from; None for point masses."""


class Drafter:
    """Proposes tokens for many sequences at once; plugins subclass it."""

    num_tokens: int
    """k: tokens drafted per sequence and step at most."""
    vocab_size: int | None = None
    """The vocabulary it drafts from, when it has one; must equal the target's."""

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        """One draft per request, in order; a draft may be shorter than asked, or empty."""
        raise NotImplementedError

    def release(self, seq_id: str) -> None:
        """Forget a finished sequence."""


DRAFTERS: Registry[Drafter] = Registry(
    "drafters",
    {
        "ngram": "services.inference.engine.drafters:NgramDrafter",
        "draft_model": "services.inference.engine.drafters:DraftModelDrafter",
    },
    base=Drafter,
)


def create_drafter(spec: Mapping[str, Any] | str, store: ArtifactStore | None = None) -> Drafter:
    """A drafter from its spec, e.g. {"type": "ngram", "num_tokens": 4}; drafters that load models get the store."""
    name = spec if isinstance(spec, str) else spec.get("type")
    cls = DRAFTERS.get(name, field="speculative.type") if isinstance(name, str) and name else None
    wants_store = cls is not None and "store" in inspect.signature(cls).parameters
    return DRAFTERS.create(spec, field="speculative", **({"store": store} if wants_store else {}))


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) [vocab]: what to draw from after rejecting a draft, so the output follows p."""
    residual = (p - q).clamp(min=0)
    total = residual.sum()
    return residual / total if total > 0 else p  # total is 0 only when p == q, where nothing is rejected


def rejection_sample(
    p: torch.Tensor, q: torch.Tensor | None, drafts: list[int], generator: torch.Generator
) -> tuple[int, int]:
    """p [k + 1, vocab] target, q [k, vocab] draft (None: point masses), k drafts -> (accepted, next token)."""
    for i, token in enumerate(drafts):
        q_token = 1.0 if q is None else float(q[i, token])
        if float(torch.rand(1, generator=generator)) * q_token < float(p[i, token]):  # u < p / q
            continue
        q_i = torch.nn.functional.one_hot(torch.tensor(token), p.shape[-1]).float() if q is None else q[i]
        return i, int(torch.multinomial(residual_distribution(p[i], q_i), 1, generator=generator))
    return len(drafts), int(torch.multinomial(p[len(drafts)], 1, generator=generator))


class Speculator:
    """The engine's side of speculative decoding: drafts into the step's chunks, verdicts out of its logits."""

    def __init__(self, drafter: Drafter, cache: KVCache, *, token_budget: int, vocab_size: int) -> None:
        if drafter.vocab_size is not None and drafter.vocab_size != vocab_size:
            raise InvalidArgument(
                f"the drafter's vocabulary has {drafter.vocab_size} tokens, the model's {vocab_size}",
                field="speculative",
            )
        self.drafter = drafter
        self.cache = cache
        self.token_budget = token_budget
        self.num_drafted = 0
        self.num_accepted = 0
        self._pending: dict[str, Draft] = {}

    def extend(self, chunks: list[StepChunk], requests: Mapping[str, DraftRequest]) -> list[StepChunk]:
        """The step's chunks, with drafts appended to those of `requests` that fit the token budget and cache."""
        self._pending.clear()
        room = self.token_budget - sum(len(c.token_ids) for c in chunks)
        asked = []
        for chunk in chunks:
            request = requests.get(chunk.seq_id)
            if request is None:
                continue
            n = min(self.drafter.num_tokens, request.max_tokens, room)
            end = chunk.start + len(chunk.token_ids)
            if n > 0 and self.cache.can_allocate(chunk.seq_id, end + n):
                self.cache.allocate(chunk.seq_id, end + n)  # kept by the sequence even if drafts are rejected
                asked.append(replace(request, max_tokens=n))
                room -= n
        drafts = dict(zip([r.seq_id for r in asked], self.drafter.propose(asked) if asked else [], strict=True))
        out = []
        for chunk in chunks:
            draft = drafts.get(chunk.seq_id)
            if draft is None or not draft.token_ids:
                out.append(chunk)
                continue
            self._pending[chunk.seq_id] = draft
            k = len(draft.token_ids)
            out.append(replace(chunk, token_ids=chunk.token_ids + draft.token_ids, num_logits=1 + k))
        return out

    def verify(
        self, seq_id: str, logits: torch.Tensor, sampler: Sampler, ctx: SamplingContext
    ) -> tuple[list[int], int]:
        """Target logits [k + 1, vocab] of a drafted chunk -> (tokens to emit, drafts accepted)."""
        draft = self._pending.pop(seq_id)
        # Plain greedy: p (and a greedy drafter's q) is one-hot, so rejection sampling reduces to keeping
        # the drafts that equal the target's argmax and emitting the argmax after them.
        if sampler.plain_greedy:
            best = logits.argmax(-1).tolist()  # [k + 1]
            accepted = next((i for i, t in enumerate(draft.token_ids) if t != best[i]), len(draft.token_ids))
            self.num_drafted += len(draft.token_ids)
            self.num_accepted += accepted
            return [*draft.token_ids[:accepted], best[accepted]], accepted
        p = torch.stack(
            [
                sampler.distribution(logits[i], SamplingContext(ctx.prompt_ids, ctx.output_ids + draft.token_ids[:i]))
                for i in range(len(draft.token_ids) + 1)
            ]
        )  # [k + 1, vocab]
        accepted, token = rejection_sample(p, draft.probs, draft.token_ids, sampler.generator)
        self.num_drafted += len(draft.token_ids)
        self.num_accepted += accepted
        return [*draft.token_ids[:accepted], token], accepted

    def release(self, seq_id: str) -> None:
        self._pending.pop(seq_id, None)
        self.drafter.release(seq_id)
