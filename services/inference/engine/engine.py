"""LLMEngine: requests in, tokens out, one step at a time; the in-process core of the inference service.

    engine = LLMEngine(load_model("models/tiny/1", store))
    rid = engine.add_request([1, 2, 3], SamplingParams(max_tokens=8, temperature=0))
    while engine.has_unfinished():
        for out in engine.step(): ...

Each `step()` schedules (scheduler.py), runs one packed forward over the paged cache
(model_runner.py, kv_cache.py), samples the sequences whose chunk reached their end
(sampling.py) and reports progress per request. With a drafter, those chunks also carry drafted
tokens that the same forward pass verifies (speculative.py). Requests are validated completely in
`add_request`, so a bad one is refused before any engine work. `stream()` drives steps from an
asyncio task, with the forward pass off the event loop; a stream the caller stops reading is
aborted, which frees its slot and blocks at the next step.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field, replace

import torch
from transformers import PreTrainedModel

from libs.common.errors import InvalidArgument
from services.inference.engine.kv_cache import KVCache, KVCacheConfig
from services.inference.engine.model_loader import LoadedModel
from services.inference.engine.model_runner import Chunk, ModelRunner
from services.inference.engine.sampling import (
    Sampler,
    SamplingContext,
    SamplingLimits,
    SamplingParams,
    TokenLogprob,
)
from services.inference.engine.scheduler import Scheduler, SchedulerConfig, Sequence
from services.inference.engine.speculative import Drafter, DraftRequest, Speculator


@dataclass
class EngineConfig:
    kv_cache: KVCacheConfig = field(default_factory=KVCacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    limits: SamplingLimits = field(default_factory=SamplingLimits)
    max_model_len: int | None = None
    """Context limit in tokens; default the model's, capped by what the KV cache holds."""


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


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int
    """Prompt tokens of the first sample served from the prefix cache."""

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sequences: list[Sequence]
    samplers: list[Sampler]
    completions: list[CompletionOutput]
    emitted: list[int]  # tokens of each completion already reported
    unfinished: int  # completions without a finish reason


class LLMEngine:
    """Continuous-batching generation over one model on one device."""

    def __init__(
        self,
        model: LoadedModel | PreTrainedModel,
        config: EngineConfig | None = None,
        *,
        detokenize: Callable[[list[int]], str] | None = None,
        drafter: Drafter | None = None,
    ) -> None:
        module = model.module if isinstance(model, LoadedModel) else model
        self.config = config or EngineConfig()
        self.model_config = module.config
        param = next(module.parameters())
        self.cache = KVCache(module.config, self.config.kv_cache, dtype=param.dtype, device=param.device)
        self.runner = ModelRunner(module, self.cache)
        self.scheduler = Scheduler(self.config.scheduler, self.cache)
        self.detokenize = detokenize
        self.vocab_size: int = module.config.vocab_size
        budget = self.config.scheduler.max_num_batched_tokens
        self.speculator = (
            Speculator(drafter, self.cache, token_budget=budget, vocab_size=self.vocab_size) if drafter else None
        )
        model_len = getattr(module.config, "max_position_embeddings", None) or self.cache.capacity_tokens
        self.max_model_len = min(self.config.max_model_len or model_len, model_len, self.cache.capacity_tokens)
        eos = module.config.eos_token_id
        self.eos_token_ids: set[int] = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self._requests: dict[str, _Request] = {}
        self._by_seq: dict[str, tuple[_Request, int]] = {}
        self._lock = threading.Lock()
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._driver: asyncio.Task[None] | None = None

    # -- requests ---------------------------------------------------------------------------------
    def add_request(
        self, prompt_ids: Iterable[int], params: SamplingParams | None = None, *, request_id: str | None = None
    ) -> str:
        """Validate and queue a request; raises InvalidArgument, or ResourceExhausted when the queue is full."""
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt_ids]
        self._validate(prompt, params, request_id)
        rid = request_id or uuid.uuid4().hex
        seed = params.seed if params.seed is not None else secrets.randbits(62)
        samplers = [Sampler(params, seed + i) for i in range(params.n)]
        seqs = [Sequence(f"{rid}/{i}", rid, list(prompt), len(prompt)) for i in range(params.n)]
        completions = [CompletionOutput(i) for i in range(params.n)]
        request = _Request(rid, prompt, params, seqs, samplers, completions, [0] * params.n, params.n)
        with self._lock:
            if rid in self._requests:
                raise InvalidArgument(f"{rid!r} is already running", field="request_id")
            self.scheduler.add(seqs)
            self._requests[rid] = request
            self._by_seq.update({s.seq_id: (request, i) for i, s in enumerate(seqs)})
        return rid

    def _validate(self, prompt: list[int], params: SamplingParams, request_id: str | None) -> None:
        if not prompt:
            raise InvalidArgument("must hold at least one token", field="prompt")
        if not all(0 <= t < self.vocab_size for t in prompt):
            raise InvalidArgument(f"token ids must be in [0, {self.vocab_size})", field="prompt")
        if len(prompt) >= self.max_model_len:
            raise InvalidArgument(
                f"{len(prompt)} tokens do not fit the context of {self.max_model_len}", field="prompt"
            )
        params.validate(self.vocab_size, self.config.limits)
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise InvalidArgument(
                f"{len(prompt)} prompt tokens + {params.max_tokens} exceed the context of {self.max_model_len}",
                field="max_tokens",
            )
        if params.stop and self.detokenize is None:
            raise InvalidArgument("stop strings need a model served with its tokenizer", field="stop")
        if request_id is not None and not request_id:
            raise InvalidArgument("must not be empty", field="request_id")

    def abort(self, request_id: str) -> bool:
        """Stop a request; its slot and blocks are freed at the next step. False if it is not running."""
        with self._lock:
            if request_id not in self._requests:
                return False
            self.scheduler.abort(request_id)
            return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # -- stepping ---------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; returns the requests that progressed or finished in it."""
        with self._lock:
            scheduled = self.scheduler.schedule()
            touched = {s.request_id: self._finish(s, "abort", free=False) for s in scheduled.aborted}
            drafting = self._draft_requests(scheduled.chunks, scheduled.sequences) if self.speculator else {}
        if scheduled.chunks:
            chunks = self.speculator.extend(scheduled.chunks, drafting) if self.speculator else scheduled.chunks
            logits = self.runner.forward(chunks)  # [sampled + drafted, vocab]
            with self._lock:
                self.scheduler.advance(scheduled)
                sampled = [(c, s) for c, s in zip(chunks, scheduled.sequences, strict=True) if c.sample]
                rows = logits.split([c.num_logits for c, _ in sampled])  # [1 + drafted, vocab] each
                for (chunk, seq), seq_logits in zip(sampled, rows, strict=True):
                    if chunk.num_logits == 1:
                        touched[seq.request_id] = self._append(seq, seq_logits[0])
                    else:
                        touched[seq.request_id] = self._append_verified(seq, seq_logits)
        return [self._report(r) for r in touched.values()]

    def _draft_requests(self, chunks: list[Chunk], sequences: list[Sequence]) -> dict[str, DraftRequest]:
        """What each sequence about to sample may draft: up to its max_tokens and the context, less one."""
        requests = {}
        for chunk, seq in zip(chunks, sequences, strict=True):
            if chunk.sample:
                request, index = self._by_seq[seq.seq_id]
                room = min(request.params.max_tokens - len(seq.output_ids), self.max_model_len - len(seq.token_ids))
                ctx = SamplingContext(request.prompt_ids, seq.output_ids)
                requests[seq.seq_id] = DraftRequest(seq.seq_id, seq.token_ids, room - 1, request.samplers[index], ctx)
        return requests

    def _append(self, seq: Sequence, logits: torch.Tensor) -> _Request:
        request, index = self._by_seq[seq.seq_id]
        ctx = SamplingContext(request.prompt_ids, seq.output_ids)
        token, logprob = request.samplers[index].sample(logits, ctx)
        self._push(request, index, seq, token, logprob)
        return request

    def _append_verified(self, seq: Sequence, logits: torch.Tensor) -> _Request:
        """logits [1 + k, vocab] of a chunk that carried k drafts: emit the accepted ones and one more."""
        assert self.speculator is not None
        request, index = self._by_seq[seq.seq_id]
        sampler, completion = request.samplers[index], request.completions[index]
        ctx = SamplingContext(request.prompt_ids, seq.output_ids)
        tokens, accepted = self.speculator.verify(seq.seq_id, logits, sampler, ctx)
        completion.num_draft_tokens += len(logits) - 1
        completion.num_accepted_tokens += accepted
        for row, token in enumerate(tokens):
            logprob = sampler.logprob(logits[row].cpu(), token) if request.params.logprobs is not None else None
            if self._push(request, index, seq, token, logprob):
                return request
        self.scheduler.accept(seq, accepted)
        return request

    def _push(self, request: _Request, index: int, seq: Sequence, token: int, logprob: TokenLogprob | None) -> bool:
        """Append a token to a sample; True if it finished the sample."""
        completion = request.completions[index]
        seq.token_ids.append(token)
        completion.token_ids.append(token)
        if logprob is not None:
            completion.logprobs.append(logprob)
        reason = self._finish_reason(request, completion, token)
        if reason is not None:
            self._finish(seq, reason, free=True)
        return reason is not None

    def _finish_reason(self, request: _Request, completion: CompletionOutput, token: int) -> str | None:
        params = request.params
        if self.detokenize is not None:
            completion.text = self.detokenize(completion.token_ids)
            cut = min((i for i in (completion.text.find(s) for s in params.stop) if i >= 0), default=-1)
            if cut >= 0:
                completion.text = completion.text[:cut]
                return "stop"
        if token in params.stop_token_ids or (token in self.eos_token_ids and not params.ignore_eos):
            return "stop"
        total = len(request.prompt_ids) + len(completion.token_ids)
        if len(completion.token_ids) >= params.max_tokens or total >= self.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str, *, free: bool) -> _Request:
        request, index = self._by_seq.pop(seq.seq_id)
        request.completions[index].finish_reason = reason
        if free:
            self.scheduler.finish(seq)
        if self.speculator is not None:
            self.speculator.release(seq.seq_id)
        request.unfinished -= 1
        if request.unfinished == 0:
            del self._requests[request.request_id]
        return request

    def _report(self, request: _Request) -> RequestOutput:
        outputs = []
        for i, c in enumerate(request.completions):
            new = c.token_ids[request.emitted[i] :]
            request.emitted[i] = len(c.token_ids)
            outputs.append(replace(c, token_ids=list(c.token_ids), logprobs=list(c.logprobs), new_token_ids=new))
        return RequestOutput(request.request_id, request.prompt_ids, outputs, request.sequences[0].num_cached)

    # -- conveniences -----------------------------------------------------------------------------
    def generate(self, prompts: Iterable[Iterable[int]], params: SamplingParams | None = None) -> list[RequestOutput]:
        """Run prompts to completion, feeding the queue as it drains; outputs in prompt order."""
        params = params or SamplingParams()
        pending = deque(enumerate(prompts))
        total = len(pending)
        order: dict[str, int] = {}
        done: dict[int, RequestOutput] = {}
        while pending or self.has_unfinished():
            room = self.config.scheduler.max_waiting - len(self.scheduler.waiting)
            while pending and room >= params.n:
                index, prompt = pending.popleft()
                order[self.add_request(prompt, params)] = index
                room -= params.n
            for out in self.step():
                if out.finished and out.request_id in order:
                    done[order.pop(out.request_id)] = out
        return [done[i] for i in range(total)]

    async def stream(
        self, prompt_ids: Iterable[int], params: SamplingParams | None = None, *, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's progress step by step; closing the iterator early aborts the request.

        Steps are driven by one asyncio task per engine; do not call `step()` or `generate()` meanwhile.
        """
        rid = self.add_request(prompt_ids, params, request_id=request_id)
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[rid] = queue
        if self._driver is None or self._driver.done():
            self._driver = asyncio.get_running_loop().create_task(self._drive())
        finished = False
        try:
            while not finished:
                out = await queue.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
        finally:
            del self._streams[rid]
            if not finished:
                self.abort(rid)

    async def _drive(self) -> None:
        """Step while there is work; a failed step fails every open stream instead of leaving it waiting."""
        try:
            while self.has_unfinished():
                for out in await asyncio.to_thread(self.step):
                    queue = self._streams.get(out.request_id)
                    if queue is not None:
                        queue.put_nowait(out)
        except Exception as e:
            for queue in self._streams.values():
                queue.put_nowait(e)
            raise
