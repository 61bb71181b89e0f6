"""The built-in drafters of speculative decoding (see speculative.py): n-gram prompt lookup and a draft model.

- "ngram": finds the latest earlier occurrence of the sequence's last n tokens (n from
  `max_ngram` down to `min_ngram`) and proposes the tokens that followed it. Free to run, and
  strong where the output copies its input (code edits, quoting, extraction).
- "draft_model": a smaller causal LM with the target's tokenizer samples k tokens one by one,
  with the request's own sampling pipeline, on its own paged KV cache (no prefix caching: its
  blocks hold drafts that may be rejected). It remembers which tokens its cache holds per
  sequence and recomputes only from the first one the target did not accept.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import PreTrainedModel

from libs.common.artifacts import ArtifactStore
from libs.common.errors import InvalidArgument
from services.inference.engine.batch import StepChunk
from services.inference.engine.kv_cache import KVCache, KVCacheConfig
from services.inference.engine.model_loader import LoadedModel, load_model
from services.inference.engine.model_runner import ModelRunner
from services.inference.engine.sampling import SamplingContext
from services.inference.engine.speculative import Draft, Drafter, DraftRequest


class NgramDrafter(Drafter):
    """Prompt lookup: propose what followed the last occurrence of the current n-gram."""

    def __init__(self, num_tokens: int = 4, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram or num_tokens < 1:
            raise ValueError("need num_tokens >= 1 and 1 <= min_ngram <= max_ngram")
        self.num_tokens, self.max_ngram, self.min_ngram = num_tokens, max_ngram, min_ngram

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        return [Draft(self.lookup(r.token_ids, r.max_tokens), None) for r in requests]

    def lookup(self, token_ids: list[int], max_tokens: int) -> list[int]:
        tokens = torch.tensor(token_ids)
        for n in range(min(self.max_ngram, len(token_ids) - 1), self.min_ngram - 1, -1):
            windows = tokens.unfold(0, n, 1)[:-1]  # [len - n, n]: every n-gram but the last one
            starts = (windows == tokens[-n:]).all(-1).nonzero()
            if len(starts):
                follow = int(starts[-1]) + n
                return token_ids[follow : follow + max_tokens]
        return []


@dataclass
class _Cached:
    """What the draft cache holds for a sequence: KV of token_ids[:known] followed by `drafted`."""

    known: int
    drafted: list[int]


class DraftModelDrafter(Drafter):
    """Drafts with a smaller model that shares the target's tokenizer."""

    def __init__(
        self,
        model: LoadedModel | PreTrainedModel | str,
        num_tokens: int = 4,
        kv_cache: KVCacheConfig | Mapping[str, Any] | None = None,
        store: ArtifactStore | None = None,
    ) -> None:
        if num_tokens < 1:
            raise ValueError("num_tokens must be >= 1")
        if isinstance(model, str):
            if store is None:
                raise InvalidArgument("a draft model given by location needs an artifact store", field="model")
            model = load_model(model, store)
        module = model.module if isinstance(model, LoadedModel) else model
        config = KVCacheConfig(**kv_cache) if isinstance(kv_cache, Mapping) else kv_cache or KVCacheConfig()
        param = next(module.parameters())
        self.cache = KVCache(
            module.config, replace(config, prefix_caching=False), dtype=param.dtype, device=param.device
        )
        self.runner = ModelRunner(module, self.cache)
        self.num_tokens = num_tokens
        self.vocab_size = module.config.vocab_size
        positions = getattr(module.config, "max_position_embeddings", None) or self.cache.capacity_tokens
        self.max_len = min(positions, self.cache.capacity_tokens)
        self._cached: dict[str, _Cached] = {}

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        drafts: dict[str, list[int]] = {r.seq_id: [] for r in requests}
        probs: dict[str, list[torch.Tensor]] = {r.seq_id: [] for r in requests}
        live = [started for r in requests if (started := self._start(r)) is not None]
        while live:
            logits = self.runner.forward([chunk for _, chunk in live])  # [len(live), vocab]
            following = []
            for row, (r, chunk) in enumerate(live):
                drafted = drafts[r.seq_id]
                self._cached[r.seq_id].drafted = drafted[:]  # the chunk just wrote the KV of all but the newest
                if r.sampler.plain_greedy:  # q is one-hot: a point mass, as Draft(probs=None) says
                    drafted.append(int(logits[row].argmax()))
                else:
                    ctx = SamplingContext(r.context.prompt_ids, r.context.output_ids + drafted)
                    q = r.sampler.distribution(logits[row], ctx)  # [vocab]
                    drafted.append(int(torch.multinomial(q, 1, generator=r.sampler.generator)))
                    probs[r.seq_id].append(q)
                if len(drafted) < r.max_tokens:
                    following.append((r, StepChunk(r.seq_id, drafted[-1:], chunk.start + len(chunk.token_ids), True)))
            live = following
        return [Draft(drafts[r.seq_id], torch.stack(probs[r.seq_id]) if probs[r.seq_id] else None) for r in requests]

    def _start(self, r: DraftRequest) -> tuple[DraftRequest, StepChunk] | None:
        """The request as far as the draft cache and context allow, and the chunk of tokens that cache
        lacks (from the first one the target did not accept); None when there is no room to draft."""
        n = min(r.max_tokens, self.max_len - len(r.token_ids))
        if n < 1 or not self.cache.can_allocate(r.seq_id, len(r.token_ids) + n - 1):
            self.release(r.seq_id)
            return None
        self.cache.allocate(r.seq_id, len(r.token_ids) + n - 1)  # d_k itself is never computed
        cached = self._cached.setdefault(r.seq_id, _Cached(0, []))
        valid = cached.known
        for token, drafted in zip(r.token_ids[cached.known :], cached.drafted, strict=False):
            if token != drafted:
                break
            valid += 1
        valid = min(valid, len(r.token_ids) - 1)
        self._cached[r.seq_id] = _Cached(len(r.token_ids), [])
        return replace(r, max_tokens=n), StepChunk(r.seq_id, r.token_ids[valid:], valid, True)

    def release(self, seq_id: str) -> None:
        self._cached.pop(seq_id, None)
        self.cache.free(seq_id)
