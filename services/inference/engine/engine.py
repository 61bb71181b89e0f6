"""LLMEngine: requests in, tokens out, one step at a time; the in-process core of the inference service.

    engine = LLMEngine(load_model("models/tiny/1", store))
    rid = engine.add_request([1, 2, 3], SamplingParams(max_tokens=8, temperature=0))
    while engine.has_unfinished():
        for out in engine.step(): ...

Each `step()` schedules (scheduler.py), runs one packed forward over the paged cache
(model_runner.py, kv_cache.py), samples the sequences whose chunk reached their end
(sampling.py) and reports progress per request. With a drafter, those chunks also carry drafted
tokens that the same forward pass verifies (speculative.py). A request with beam_width > 1 runs
beam search (beam.py): its beams are sequences of the batch that fork and share cache blocks, and
its n best hypotheses are reported when the search ends. Which of the two a request runs is its
decoding strategy (decoding.py), which the engine calls and which changes the batch only through
the engine's `DecodingHost` methods (`push`, `end_completion`, `drop`, `fork`, `end`). LoRA
adapters, loaded and unloaded at run time, are chosen per request and applied per token of the
packed step (lora.py). Requests are
validated completely in `add_request`, so a bad one is refused before any engine work.

One request's failure is its own: a forward pass that raises is run again one request at a time,
and a request whose logits are not finite or whose sampling raises is failed with
`RequestFailed` (its sequences are aborted at the next step) while the rest of the batch goes on.
Only a step that fails for every request at once fails the engine.

`stream()` drives steps from a thread of the engine's own while it has work, which hands each
step's outputs to the streams' event loops without waiting for them; a stream the caller stops
reading is aborted, which frees its slot and blocks at the next step. Each stream holds at most one
undelivered output (`_Outbox`): progress a slow reader has not taken yet is merged into it, so
memory stays bounded however far the reader falls behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import secrets
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from libs.common.artifacts import ArtifactStore
from libs.common.errors import FailedPrecondition, InvalidArgument, LlmpError, NotFound
from services.inference.engine.batch import StepChunk
from services.inference.engine.beam import BeamDecoding, BeamSearch, check_beams
from services.inference.engine.decoding import SAMPLE, CompletionOutput, Decoding, RequestState
from services.inference.engine.kv_cache import KVCache, KVCacheConfig
from services.inference.engine.lora import LoraAdapters, adapter_dir
from services.inference.engine.model_loader import LoadedModel
from services.inference.engine.model_runner import ModelRunner
from services.inference.engine.sampling import (
    Sampler,
    SamplingContext,
    SamplingLimits,
    SamplingParams,
    TokenLogprob,
)
from services.inference.engine.scheduler import ScheduledStep, Scheduler, SchedulerConfig, Sequence
from services.inference.engine.speculative import Drafter, DraftRequest, Speculator

log = logging.getLogger(__name__)


class RequestFailed(LlmpError):
    """One request failed inside the engine (its forward pass, logits or sampling); the others went on."""


@dataclass
class EngineConfig:
    kv_cache: KVCacheConfig = field(default_factory=KVCacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    limits: SamplingLimits = field(default_factory=SamplingLimits)
    max_model_len: int | None = None
    """Context limit in tokens; default the model's, capped by what the KV cache holds."""
    compile: bool = False
    """Run decode steps of Llama-style models as one compiled graph (model_runner.py); the first
    decode step compiles it, which takes about a minute on a small CPU."""
    sliding_window: int | None = None
    """Each token attends to the last this many tokens only (itself included), and the KV cache frees
    a sequence's blocks once they are wholly older than that. None: the model config's
    `sliding_window` if it has one, which is masked but frees nothing."""
    pack_weights: bool = False
    """Keep float projection weights of Llama-style models in oneDNN's layout on CPU (decoder.Packed):
    faster matmuls for the same memory, but the model's modules then hold stand-ins of their weights,
    so set it only for a model that nothing but this engine runs (the inference service does)."""
    few_rows_kernel: bool = True
    """With `pack_weights`, bfloat16 projections keep their plain weight as well, which the engine's
    own kernel reads for steps of a few rows where the CPU has AVX-512 BF16 (kernels.few_rows_limit()):
    1.8x the packed kernel's speed at one row on an AMX Xeon, for a second copy of those weights.
    False: packed weights only."""
    attention_kernel: bool = True
    """Decoding rows attend through the engine's CPU kernel (engine/kernels) where it builds; False:
    through tensor operations (SDPA over gathered blocks, or the compiled graph's own loops)."""


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int
    """Prompt tokens of the first sample served from the prefix cache."""
    error: LlmpError | None = None
    """Set when the request failed (RequestFailed); its streams raise it."""

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)

    def after(self, earlier: RequestOutput) -> RequestOutput:
        """This output as the one progress report since `earlier`'s reader last read: it holds whole
        completions, so only the new tokens of both need keeping (in place; returns self)."""
        for old, new in zip(earlier.outputs, self.outputs, strict=True):
            new.new_token_ids = old.new_token_ids + new.new_token_ids
        return self


class LLMEngine:
    """Continuous-batching generation over one model on one device; the `DecodingHost` of its requests' strategies."""

    def __init__(
        self,
        model: LoadedModel | PreTrainedModel,
        config: EngineConfig | None = None,
        *,
        detokenize: Callable[[list[int]], str] | None = None,
        drafter: Drafter | None = None,
        store: ArtifactStore | None = None,
        tokenizer: Any = None,
    ) -> None:
        """`store` is where `load_adapter` finds adapters; without one, none can be loaded. `tokenizer` (a
        `tokenizers.Tokenizer`) is for sampler stages that need the vocabulary's text (structured output)."""
        module = model.module if isinstance(model, LoadedModel) else model
        self.config = config or EngineConfig()
        self.model_config = module.config
        param = next(module.parameters())
        window = self.config.sliding_window
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise InvalidArgument("must be an integer >= 1", field="sliding_window")
        self.cache = KVCache(module.config, self.config.kv_cache, dtype=param.dtype, device=param.device, window=window)
        self.runner = ModelRunner(
            module,
            self.cache,
            compile=self.config.compile,
            sliding_window=window,
            pack=self.config.pack_weights,
            few_rows=self.config.few_rows_kernel,
            kernel=self.config.attention_kernel,
        )
        self.store = store
        self.adapters = LoraAdapters(module)
        self.scheduler = Scheduler(self.config.scheduler, self.cache)
        self.detokenize = detokenize
        self.vocab_size: int = module.config.vocab_size
        budget = self.config.scheduler.max_num_batched_tokens
        self.speculator = (
            Speculator(drafter, self.cache, token_budget=budget, vocab_size=self.vocab_size) if drafter else None
        )
        scaled_len = model.max_model_len if isinstance(model, LoadedModel) else None
        model_len = scaled_len or getattr(module.config, "max_position_embeddings", None) or self.cache.capacity_tokens
        self.max_model_len = min(self.config.max_model_len or model_len, model_len, self.cache.capacity_tokens)
        # The model's end tokens: config.json's and generation_config.json's (often a list, e.g. chat models').
        generation = getattr(module, "generation_config", None)
        self.eos_token_ids: set[int] = _ids(module.config.eos_token_id) | _ids(
            getattr(generation, "eos_token_id", None)
        )
        self.sampler_context = {"vocab_size": self.vocab_size, "eos_token_ids": sorted(self.eos_token_ids)}
        if tokenizer is not None:
            self.sampler_context["tokenizer"] = tokenizer
        self._batched: dict[str, Sampler] = {}  # seq id -> its sampler, for samplers with batched stages
        self._requests: dict[str, RequestState] = {}
        self._by_seq: dict[str, tuple[RequestState, int]] = {}
        self._lock = threading.Lock()
        self._streams: dict[str, _Outbox] = {}
        self._stepper: _StepThread | None = None  # the streams' step thread, from the first stream on
        self._stepper_lock = threading.Lock()
        # request ids and seeds of unseeded requests: drawn from the OS once, not per request (a system
        # call gives up the GIL, and getting it back behind the step thread costs milliseconds)
        self._random = random.Random(secrets.randbits(128))

    # -- requests ---------------------------------------------------------------------------------
    def add_request(
        self, prompt_ids: Iterable[int], params: SamplingParams | None = None, *, request_id: str | None = None
    ) -> str:
        """Validate and queue a request; raises InvalidArgument, or ResourceExhausted when the queue is full."""
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt_ids]
        self._validate(prompt, params, request_id)
        rid = request_id or uuid.UUID(int=self._random.getrandbits(128), version=4).hex
        seed = params.seed if params.seed is not None else self._random.getrandbits(62)
        beam = params.beam_width > 1
        samplers = [] if beam else [Sampler(params, seed + i, self.sampler_context) for i in range(params.n)]
        seqs = [Sequence(f"{rid}/{i}", rid, list(prompt), len(prompt)) for i in range(1 if beam else params.n)]
        completions = [CompletionOutput(i) for i in range(params.n)]
        decoding: Decoding = SAMPLE
        if beam:
            stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
            decoding = BeamDecoding(BeamSearch(seqs[0], params, stop_ids, params.max_tokens))
        request = RequestState(
            rid, prompt, params, seqs, samplers, completions, decoding, [0] * params.n, [0] * params.n, params.n
        )
        with self._lock:
            if rid in self._requests:
                raise InvalidArgument(f"{rid!r} is already running", field="request_id")
            if params.adapter is not None:
                if params.adapter not in self.adapters:
                    raise NotFound(f"no adapter {params.adapter!r} is loaded", field="adapter")
                for seq in seqs:  # its KV differs from the base model's for the same tokens
                    seq.cache_salt = self.adapters.adapters[params.adapter].key
            self.scheduler.add(seqs)
            self._requests[rid] = request
            self._by_seq.update({s.seq_id: (request, i) for i, s in enumerate(seqs)})
            self._batched.update(
                {s.seq_id: samplers[i] for i, s in enumerate(seqs) if samplers and samplers[i].batched}
            )
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
        if params.beam_width > 1:
            check_beams(len(prompt), params, self.cache.block_size, self.cache.num_blocks, self.speculator is not None)
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

    def load_adapter(self, name: str, location: str | Path) -> None:
        """Load a peft LoRA folder (a store id or a path inside the store) for requests to name."""
        if self.store is None:
            raise FailedPrecondition("the engine was built without an artifact store", field="adapter")
        directory = adapter_dir(location, self.store)
        with self._lock:
            self.adapters.load(name, directory)

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter; refused while a request uses it."""
        with self._lock:
            if any(r.params.adapter == name for r in self._requests.values()):
                raise FailedPrecondition(f"adapter {name!r} is in use", field="adapter")
            self.adapters.unload(name)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    def warm_up(self) -> float:
        """With `compile`, compile the decode graphs now instead of in the first requests' steps: a
        decode step of one sequence and one of two. Call before serving. Returns the seconds it took."""
        if self.runner.compiled is None:
            return 0.0
        start = time.perf_counter()
        params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
        for batch in (1, 2):
            for i in range(batch):
                self.add_request([0] * (2 + i), params)
            while self.has_unfinished():
                self.step()
        return time.perf_counter() - start

    # -- stepping ---------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; returns the requests that progressed, finished or failed in it."""
        self._drive_here()
        return [self._report(r) for r in self._step()]

    def _drive_here(self) -> None:
        """Before step() or generate() drive the engine: wait for the streams' step thread to park
        where every stream has closed (it does once their requests are gone), and refuse while
        a stream is open, whose thread would step the same requests at the same time."""
        stepper = self._stepper
        if stepper is None or stepper.thread is threading.current_thread():
            return
        if self._streams:
            raise RuntimeError(
                "the engine is driven by its streams' step thread while a stream is open; "
                "step() and generate() cannot drive it meanwhile"
            )
        stepper.wait_idle()

    def _step(self) -> list[RequestState]:
        """One scheduling step: the requests that progressed, finished or failed in it, not yet reported
        (a report copies the completions and decodes their text, so it is made only where it is read)."""
        with self._lock:
            scheduled = self.scheduler.schedule()
            touched = {s.request_id: self._finish(s, "abort", free=False) for s in scheduled.aborted}
            drafting = self._draft_requests(scheduled.chunks, scheduled.sequences) if self.speculator else {}
            adapters = [self._by_seq[s.seq_id][0].params.adapter for s in scheduled.sequences]
        if scheduled.chunks:
            chunks = self.speculator.extend(scheduled.chunks, drafting) if self.speculator else scheduled.chunks
            logits, kept, failed = self._forward(chunks, scheduled.sequences, adapters)  # [rows, vocab]
            with self._lock:
                for rid, error in failed.items():
                    touched[rid] = self._fail(self._requests[rid], error)
                if failed:  # only what was computed enters the cache (and the prefix cache)
                    scheduled = ScheduledStep(
                        [scheduled.chunks[i] for i in kept], [scheduled.sequences[i] for i in kept], []
                    )
                    chunks = [chunks[i] for i in kept]
                self.scheduler.advance(scheduled)
                touched.update(self._sample(chunks, scheduled.sequences, logits))
        return list(touched.values())

    def _forward(
        self, chunks: list[StepChunk], sequences: list[Sequence], adapters: list[str | None]
    ) -> tuple[torch.Tensor, list[int], dict[str, BaseException]]:
        """The step's logits [rows, vocab], the indices of the chunks they are for, the requests whose forward raised.

        A failing pass is run again one request at a time (their KV slots are simply written again), so
        one request's failure is its own; when every request fails alone too, the engine itself is broken.
        """
        try:
            return self._run(chunks, adapters), list(range(len(chunks))), {}
        except Exception as error:
            batch_error = error
        by_request: dict[str, list[int]] = {}
        for i, seq in enumerate(sequences):
            by_request.setdefault(seq.request_id, []).append(i)
        failed: dict[str, BaseException] = {}
        parts: list[tuple[list[int], torch.Tensor]] = []
        for rid, ix in by_request.items():
            try:
                parts.append((ix, self._run([chunks[i] for i in ix], [adapters[i] for i in ix])))
            except Exception as e:
                failed[rid] = e
        if len(by_request) > 1 and not parts:
            raise batch_error
        parts.sort(key=lambda part: part[0][0])  # back into step order, as the chunks are
        kept = [i for ix, _ in parts for i in ix]
        rows = [part for _, part in parts] or [torch.empty(0, self.vocab_size)]
        return torch.cat(rows), kept, failed

    def _run(self, chunks: list[StepChunk], adapters: list[str | None]) -> torch.Tensor:
        with self.adapters.step([a for c, a in zip(chunks, adapters, strict=True) for _ in c.token_ids]):
            return self.runner.forward(chunks)  # [sampled + drafted, vocab]

    def _sample(
        self, chunks: list[StepChunk], sequences: list[Sequence], logits: torch.Tensor
    ) -> dict[str, RequestState]:
        """Append each sampling sequence's next tokens; a request whose logits or sampling fail fails alone."""
        sampled = [(c, s) for c, s in zip(chunks, sequences, strict=True) if c.sample]
        if not sampled:
            return {}
        # One sum per step (a NaN or infinity anywhere makes it non-finite; so may an overflow, which the
        # row check then clears); rows are looked at one by one only when the sum is not finite.
        finite = None if math.isfinite(float(logits.sum())) else torch.isfinite(logits).all(-1).tolist()
        if self._batched:
            self._prepare_batched(sampled)
        # Every row's argmax at once: what plain greedy sequences pick, without a per-row pipeline.
        best = logits.argmax(-1).tolist() if any(c.num_logits == 1 for c, _ in sampled) else []
        touched: dict[str, RequestState] = {}
        row = 0
        for chunk, seq in sampled:
            rows = slice(row, row + chunk.num_logits)
            row += chunk.num_logits
            entry = self._by_seq.get(seq.seq_id)
            if entry is None or entry[0].error is not None:  # its request failed earlier in this step
                continue
            request, index = entry
            touched[request.request_id] = request
            if finite is not None and not all(finite[rows]):
                self._fail(request, FloatingPointError("the model's logits are not finite"))
                continue
            try:
                if chunk.num_logits == 1:
                    request.decoding.append(self, request, index, seq, logits[rows.start], best[rows.start])
                else:
                    self._append_verified(request, index, seq, logits[rows])
            except Exception as e:
                self._fail(request, e)
        return touched

    def _prepare_batched(self, sampled: list[tuple[StepChunk, Sequence]]) -> None:
        """Let stages that work for the whole batch (structured output's masks) do so, once per step and kind."""
        by_kind: dict[type, list[tuple[Any, SamplingContext]]] = {}
        for _, seq in sampled:
            sampler = self._batched.get(seq.seq_id)
            if sampler is not None:
                ctx = SamplingContext(self._by_seq[seq.seq_id][0].prompt_ids, seq.output_ids)
                for stage in sampler.batched:
                    by_kind.setdefault(type(stage), []).append((stage, ctx))
        for kind, items in by_kind.items():
            try:
                kind.prepare_batch(items)  # type: ignore[attr-defined]
            except Exception:  # each stage then does its own work, and a failing one fails its request alone
                log.exception("batched sampler stage %s failed; its stages run one by one", kind.__name__)

    def _fail(self, request: RequestState, error: BaseException) -> RequestState:
        """Fail one request: its streams get RequestFailed now, its sequences are aborted at the next step."""
        log.error("request %s failed in the engine: %r", request.request_id, error, exc_info=error)
        if request.error is None:
            request.error = RequestFailed(
                f"request {request.request_id!r} failed in the engine ({type(error).__name__}); "
                "other requests were not affected"
            )
            self.scheduler.abort(request.request_id)
        return request

    def _draft_requests(self, chunks: list[StepChunk], sequences: list[Sequence]) -> dict[str, DraftRequest]:
        """What each sequence about to sample may draft: up to its max_tokens and the context, less one."""
        requests = {}
        for chunk, seq in zip(chunks, sequences, strict=True):
            if chunk.sample:
                request, index = self._by_seq[seq.seq_id]
                room = min(request.params.max_tokens - len(seq.output_ids), self.max_model_len - len(seq.token_ids))
                ctx = SamplingContext(request.prompt_ids, seq.output_ids)
                requests[seq.seq_id] = DraftRequest(seq.seq_id, seq.token_ids, room - 1, request.samplers[index], ctx)
        return requests

    def _append_verified(self, request: RequestState, index: int, seq: Sequence, logits: torch.Tensor) -> None:
        """logits [1 + k, vocab] of a chunk that carried k drafts: emit the accepted ones and one more."""
        assert self.speculator is not None
        sampler, completion = request.samplers[index], request.completions[index]
        ctx = SamplingContext(request.prompt_ids, seq.output_ids)
        tokens, accepted = self.speculator.verify(seq.seq_id, logits, sampler, ctx)
        completion.num_draft_tokens += len(logits) - 1
        completion.num_accepted_tokens += accepted
        for row, token in enumerate(tokens):
            logprob = sampler.logprob(logits[row].cpu(), token) if request.params.logprobs is not None else None
            if self.push(request, index, seq, token, logprob):
                return
        self.scheduler.accept(seq, accepted)

    # -- the decoding strategies' host (decoding.DecodingHost) -------------------------------------
    def push(self, request: RequestState, index: int, seq: Sequence, token: int, logprob: TokenLogprob | None) -> bool:
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

    def end_completion(self, request: RequestState, index: int, seq: Sequence, reason: str, free: bool) -> None:
        request.completions[index].finish_reason = reason
        self._batched.pop(seq.seq_id, None)
        if free:
            self.scheduler.finish(seq)
        if self.speculator is not None:
            self.speculator.release(seq.seq_id)
        request.unfinished -= 1
        if request.unfinished == 0:
            del self._requests[request.request_id]

    def drop(self, seq: Sequence) -> None:
        del self._by_seq[seq.seq_id]
        self.scheduler.finish(seq)

    def fork(self, request: RequestState, parent: Sequence, child: Sequence) -> None:
        self.scheduler.fork(parent, child)
        self._by_seq[child.seq_id] = (request, 0)

    def end(self, request: RequestState, reasons: list[str], tokens: list[list[int]] | None = None) -> None:
        for completion, ids in zip(request.completions, tokens or [], strict=False):
            completion.token_ids = ids
            completion.text = self.detokenize(ids) if self.detokenize else None
            request.decoded[completion.index] = len(ids)
        for completion, reason in zip(request.completions, reasons, strict=False):
            completion.finish_reason = reason
        request.unfinished = 0
        del self._requests[request.request_id]

    def _finish_reason(self, request: RequestState, completion: CompletionOutput, token: int) -> str | None:
        params = request.params
        if params.stop:  # the text is looked at every token; otherwise it is decoded when reported
            assert self.detokenize is not None  # (refused without one)
            completion.text = self.detokenize(completion.token_ids)
            request.decoded[completion.index] = len(completion.token_ids)
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

    def _finish(self, seq: Sequence, reason: str, *, free: bool) -> RequestState:
        """A sequence ends (its own stop, or an abort): its request's strategy says what that means."""
        request, index = self._by_seq.pop(seq.seq_id)
        request.decoding.remove(self, request, index, seq, reason, free)
        return request

    def _report(self, request: RequestState) -> RequestOutput:
        outputs = []
        for i, c in enumerate(request.completions):
            if self.detokenize is not None and request.decoded[i] != len(c.token_ids):
                c.text, request.decoded[i] = self.detokenize(c.token_ids), len(c.token_ids)
            new = c.token_ids[request.emitted[i] :]
            request.emitted[i] = len(c.token_ids)
            outputs.append(replace(c, token_ids=list(c.token_ids), logprobs=list(c.logprobs), new_token_ids=new))
        return RequestOutput(
            request.request_id, request.prompt_ids, outputs, request.sequences[0].num_cached, request.error
        )

    # -- conveniences -----------------------------------------------------------------------------
    def generate(self, prompts: Iterable[Iterable[int]], params: SamplingParams | None = None) -> list[RequestOutput]:
        """Run prompts to completion, feeding the queue as it drains; outputs in prompt order."""
        self._drive_here()
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
            for request in self._step():
                if request.unfinished == 0 and request.request_id in order:
                    done[order.pop(request.request_id)] = self._report(request)
        return [done[i] for i in range(total)]

    async def stream(
        self,
        prompt_ids: Iterable[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        final_only: bool = False,
        interval: Callable[[], float] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's progress step by step; closing the iterator early aborts the request.

        `final_only`: yield only the finished output. `interval`: after each output, the next one waits
        for the next tick of a clock ticking every `interval()` seconds, at least half an interval away
        (`next_tick`), with the progress made meanwhile merged into it: one output an interval on
        average, and streams paced alike come due at the same step, so their loop wakes once for all
        of them. Either way the reader is not woken for the steps in between (at 64 streams a wake-up
        each per step cost the step loop a quarter of a core); the first output and the finished one
        (or an error) go at once.

        Steps are driven by the engine's step thread (`_StepThread`, `_drive`): `step()` and `generate()`
        are refused while a stream is open, and wait for that thread to park after the last one closed.
        """
        rid = self.add_request(prompt_ids, params, request_id=request_id)
        outbox = self._streams[rid] = _Outbox(math.inf if final_only else 0.0)
        with self._stepper_lock:
            if self._stepper is None or self._stepper.ended:
                self._stepper = _StepThread(self)
            self._stepper.wake()
        finished = False
        try:
            while not finished:
                out = await outbox.get()
                if isinstance(out, BaseException):
                    raise out
                if out.error is not None:
                    raise out.error
                finished = out.finished
                yield out
                if interval is not None and not final_only:
                    outbox.wake_at = next_tick(time.monotonic(), interval())
        finally:
            del self._streams[rid]
            if not finished:
                self.abort(rid)

    def _drive(self) -> None:
        """Step while there is work (on the streams' step thread), handing each step's outputs to their
        streams' event loops without waiting for them to be read: the next step starts at once, and a
        loop's own work (taking requests in, sending results) runs beside the step instead of between
        steps. A failed step fails every open stream."""
        try:
            while self.has_unfinished():
                self._deliver([self._report(r) for r in self._step() if self._due(r)])
        except BaseException as e:
            log.error("an engine step failed: %r", e)  # the streams' readers get it as their error
            self._deliver([], error=e)
            if not isinstance(e, Exception):
                raise

    def _due(self, request: RequestState) -> bool:
        """Whether a stream reads the request's progress now: it has one (it may have just closed) and
        that one is awake, or the request ended or failed. Progress not read now is reported later,
        merged (the tokens new since the last report, the whole completions)."""
        outbox = self._streams.get(request.request_id)
        if outbox is None:
            return False
        return request.unfinished == 0 or request.error is not None or time.monotonic() >= outbox.wake_at

    def _deliver(self, outputs: list[RequestOutput], error: BaseException | None = None) -> None:
        """Put outputs (or `error`, in every open stream) into their outboxes, on each outbox's loop: one
        wake-up per loop per step. A closed loop's streams are gone with it."""
        if error is not None:
            pairs: list[tuple[_Outbox, RequestOutput | BaseException]] = [
                (o, error) for o in list(self._streams.values())
            ]
        else:
            pairs = [(o, out) for out in outputs if (o := self._streams.get(out.request_id)) is not None]
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Outbox, RequestOutput | BaseException]]] = {}
        for outbox, item in pairs:
            by_loop.setdefault(outbox.loop, []).append((outbox, item))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(_put_all, items)


def next_tick(now: float, period: float) -> float:
    """The first multiple of `period` at least half a period after `now` (at most one and a half): paced
    streams due on the same clock come due at the same step, and their outputs go out together (one
    wake-up of their loop; in a replica, one message of a gathered call) instead of one a step."""
    if period <= 0:
        return now
    return (math.floor(now / period + 0.5) + 1) * period


def _ids(value: int | list[int] | None) -> set[int]:
    return set(value if isinstance(value, list) else [] if value is None else [value])


def _put_all(items: list[tuple[_Outbox, RequestOutput | BaseException]]) -> None:
    for outbox, item in items:
        outbox.put(item)


class _StepThread:
    """An engine's step thread for its streams: started by the first stream, parked while the engine
    has no work and woken by the next stream, for the engine's whole life.

    One thread per burst of work would end a thread each time the engine went idle, and with Intel's
    OpenMP (services/inference/runtime.py preloads it) every thread that ran a parallel region leaves
    one OpenMP worker behind when it ends: a serving process gathered thousands. The thread holds the
    engine only while stepping, so an engine nobody uses is collected, and its thread then ends.
    """

    def __init__(self, engine: LLMEngine) -> None:
        self._changed = threading.Condition()
        self._woken = False  # work was added since the thread last looked
        self._stepping = False
        self.ended = False
        self.thread = threading.Thread(target=self._run, args=(weakref.ref(engine),), name="llmp-engine", daemon=True)
        weakref.finalize(engine, self._end)
        self.thread.start()

    def wake(self) -> None:
        with self._changed:
            self._woken = True
            self._changed.notify_all()

    def wait_idle(self) -> None:
        """Until the thread has stepped every request it was woken for and parked."""
        with self._changed:
            self._changed.wait_for(lambda: self.ended or not (self._woken or self._stepping))

    def _end(self) -> None:
        with self._changed:
            self.ended = True
            self._changed.notify_all()

    def _run(self, ref: weakref.ref[LLMEngine]) -> None:
        try:
            while True:
                with self._changed:
                    self._changed.wait_for(lambda: self._woken or self.ended)
                    if self.ended:
                        return
                    self._woken, self._stepping = False, True
                engine = ref()
                if engine is None:
                    return
                try:
                    engine._drive()
                finally:
                    del engine  # not held while parked
                    with self._changed:
                        self._stepping = False
                        self._changed.notify_all()
        finally:
            self._end()


class _Outbox:
    """A stream's undelivered progress: at most one output, into which later ones are merged.

    Outputs carry whole completions plus the tokens new since the previous one, so merging keeps
    the later output and the new tokens of both: a reader that falls behind gets everything in one
    output when it reads again, and memory stays bounded by the request's own size.
    """

    def __init__(self, wake_at: float = 0.0) -> None:
        self.loop = asyncio.get_running_loop()
        """Where its reader runs: outputs are put in from there."""
        self._pending: RequestOutput | BaseException | None = None
        self._ready = asyncio.Event()
        self.wake_at = wake_at
        """time.monotonic() before which an unfinished output does not wake the reader (it waits, merged)."""

    def put(self, out: RequestOutput | BaseException) -> None:
        earlier = self._pending
        if isinstance(earlier, BaseException):
            return  # an error ends the stream; nothing after it matters
        if earlier is not None and isinstance(out, RequestOutput):
            out.after(earlier)
        self._pending = out
        if (
            not isinstance(out, RequestOutput)
            or out.finished
            or out.error is not None
            or time.monotonic() >= self.wake_at
        ):
            self._ready.set()

    async def get(self) -> RequestOutput | BaseException:
        await self._ready.wait()
        self._ready.clear()
        out, self._pending = self._pending, None
        assert out is not None
        return out
