"""One model replica's work: load the model and its tokenizer, build an engine, stream requests.

`ModelServer` is plain Python: the Ray Serve deployment (serve_app.py) hosts one per replica, and
the in-process backend (core.py) uses it directly. The engine's `stream` drives the background
loop that steps the engine while any request runs; closing a request's stream (the caller
cancelled or hung up) aborts it, which frees its batch slot and KV-cache blocks at the next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from libs.common.artifacts import ArtifactStore
from libs.common.errors import InvalidArgument, LlmpError
from libs.common.planning.memory import FORMATS, ModelShape, kv_cache_bytes_per_token, weight_bytes
from services.inference.engine import (
    DRAFTERS,
    QUANTIZERS,
    EngineConfig,
    KVCacheConfig,
    LLMEngine,
    LoadedModel,
    RequestOutput,
    SamplingLimits,
    SchedulerConfig,
    create_drafter,
    load_model,
)
from services.inference.engine.decoder import SUPPORTED as DECODER_TYPES
from services.inference.engine.model_loader import model_dir, read_config
from services.inference.engine.rope import apply_rope_scaling
from services.inference.prompting import ChatTemplate, GenerationDefaults
from services.inference.schema import (
    Chunk,
    CompletionChunk,
    EngineOptions,
    GenerateInput,
    ModelFacts,
    ModelSpec,
    ReplicaStats,
)
from services.inference.text import TOKENIZER_FILE, TextDeltas, load_tokenizer

DTYPE_FORMATS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
MAX_LOADED_ADAPTERS = 8
"""Adapters a replica keeps loaded; the least recently used beyond this are unloaded."""
MAX_PROMPT_CHARS_PER_TOKEN = 64
"""A rendered chat prompt longer than this many characters per token of context cannot fit it."""


def describe_model(store: ArtifactStore, path: str, engine: EngineOptions) -> ModelFacts:
    """Check a model folder and options and read its facts from config.json, without loading any weight."""
    directory = model_dir(path, store, field="path")
    config = read_config(directory, field="path")
    quantizer: str | None = None
    for registry, value, field in (
        (QUANTIZERS, engine.quantization, "engine.quantization"),
        (DRAFTERS, engine.speculative, "engine.speculative"),
    ):
        spec = plugin_spec(value, field)  # refused here, before any replica starts
        if spec is not None:
            name = spec if isinstance(spec, str) else str(spec.get("type", ""))
            registry.get(name, field=f"{field}.type")
            quantizer = name if registry is QUANTIZERS else quantizer
    context = getattr(config, "max_position_embeddings", 0) or 0
    rope = json_spec(engine.rope_scaling, "engine.rope_scaling")
    if rope is not None:
        context = apply_rope_scaling(config, rope)
    if engine.max_model_len:
        context = min(context, engine.max_model_len) if context else engine.max_model_len
    shape = ModelShape.from_hf_config(config.to_dict())
    params = shape.param_count()
    served_format = quantizer or DTYPE_FORMATS.get(engine.dtype, "fp32")
    copy = plain_copy_bytes(shape, engine) if quantizer is None and config.model_type in DECODER_TYPES else 0
    has_tokenizer = (directory / TOKENIZER_FILE).is_file()
    return ModelFacts(
        config.model_type,
        config.vocab_size,
        context,
        has_tokenizer,
        parameters=params,
        weight_bytes=int(weight_bytes(params, served_format if served_format in FORMATS else "fp32")),
        plain_copy_bytes=copy,
        kv_bytes_per_token=kv_cache_bytes_per_token(shape, DTYPE_FORMATS.get(engine.dtype, "fp32")),
        has_chat_template=has_tokenizer and ChatTemplate.read(directory, store.root) is not None,
        sampling_defaults=GenerationDefaults.read(directory, store.root, config.vocab_size).params(),
    )


def plain_copy_bytes(shape: ModelShape, engine: EngineOptions) -> int:
    """What a replica holds beyond the weights when its bfloat16 projections keep a plain copy beside the
    packed one (`engine.packed_only` False: EngineConfig.few_rows_kernel). Counted wherever it may be
    kept: the CPU a replica lands on, with or without AVX-512 BF16, is not known here."""
    if engine.dtype != "bfloat16" or engine.packed_only:
        return 0
    h, d = shape.hidden_size, shape.dim_per_head
    attention = h * shape.num_heads * d * 2 + h * shape.kv_heads * d * 2  # q, o and k, v
    layer = attention + (3 if shape.gated_mlp else 2) * h * shape.mlp_size
    head = 0 if shape.tie_embeddings else shape.vocab_size * h  # a tied head reads the embeddings' plain weight
    return 2 * (shape.num_layers * layer + head)


def json_spec(value: str, field: str) -> dict[str, Any] | None:
    """A JSON object option; None when empty."""
    spec = plugin_spec(value, field)
    if isinstance(spec, str):
        raise InvalidArgument("must be a JSON object", field=field)
    return spec


def plugin_spec(value: str, field: str) -> dict[str, Any] | str | None:
    """A plugin given as a bare name or a JSON spec; None when empty."""
    value = value.strip()
    if not value:
        return None
    if not value.startswith("{"):
        return value
    try:
        spec = json.loads(value)
    except ValueError as e:
        raise InvalidArgument(f"not a valid JSON plugin spec: {e}", field=field) from None
    if not isinstance(spec, dict):
        raise InvalidArgument('a plugin spec is {"type": "<name>", ...params}', field=field)
    return spec


def model_bytes_per_parameter(model: LoadedModel) -> float:
    """Weights (and quantisation scales) over parameters: 4 for fp32, about 1 for int8."""
    if model.quantization is not None:
        return model.quantization.model_bytes / model.quantization.num_parameters
    params = list(model.module.parameters())
    return sum(p.numel() * p.element_size() for p in params) / sum(p.numel() for p in params)


def engine_config(options: EngineOptions, limits: SamplingLimits) -> EngineConfig:
    return EngineConfig(
        kv_cache=KVCacheConfig(memory_bytes=options.kv_cache_bytes),
        scheduler=SchedulerConfig(
            max_num_seqs=options.max_num_seqs, max_num_batched_tokens=options.max_num_batched_tokens
        ),
        limits=limits,
        max_model_len=options.max_model_len or None,
        compile=options.compile,
        sliding_window=options.sliding_window,
        pack_weights=True,  # the server's model is its engine's alone
        few_rows_kernel=not options.packed_only,
    )


class ModelServer:
    """A loaded model with its engine; `generate` streams one request through it."""

    def __init__(
        self,
        spec: ModelSpec,
        store: ArtifactStore,
        limits: SamplingLimits,
        replica_id: str = "",
        *,
        messages_per_second: float = 0.0,
    ) -> None:
        """`messages_per_second`: what this server's streams send at most, together (`generate`); 0: no bound."""
        start = time.perf_counter()
        self.messages_per_second = messages_per_second
        self.streams = 0
        self.spec = spec
        self.replica_id = replica_id or spec.name
        quantization = plugin_spec(spec.engine.quantization, "engine.quantization")
        rope = json_spec(spec.engine.rope_scaling, "engine.rope_scaling")
        model = load_model(spec.path, store, dtype=spec.engine.dtype, quantization=quantization, rope_scaling=rope)
        self.bytes_per_parameter = model_bytes_per_parameter(model)
        self.tokenizer = load_tokenizer(Path(model.path), store.root)
        self.chat_template = ChatTemplate.read(Path(model.path), store.root) if self.tokenizer else None
        detokenize = self._decode if self.tokenizer is not None else None
        speculative = plugin_spec(spec.engine.speculative, "engine.speculative")
        drafter = create_drafter(speculative, store) if speculative is not None else None
        self.engine = LLMEngine(
            model,
            engine_config(spec.engine, limits),
            detokenize=detokenize,
            drafter=drafter,
            store=store,
            tokenizer=self.tokenizer,
        )
        self.engine.warm_up()  # with engine.compile, ready when loaded rather than at the first requests
        self.load_seconds = time.perf_counter() - start
        self.failure: BaseException | None = None
        self._adapters: OrderedDict[str, None] = OrderedDict()  # loaded adapter folders, least recent first
        self._adapters_lock = threading.Lock()

    def _use_adapter(self, path: str) -> None:
        """Load the adapter folder `path` (its engine name) unless loaded; unload the least used beyond the cap."""
        with self._adapters_lock:
            if path in self._adapters:
                self._adapters.move_to_end(path)
                return
            self.engine.load_adapter(path, path)
            self._adapters[path] = None
            for old in list(self._adapters)[:-MAX_LOADED_ADAPTERS]:
                try:
                    self.engine.unload_adapter(old)
                except LlmpError:  # in use: stays loaded for now
                    continue
                del self._adapters[old]

    def _decode(self, ids: list[int]) -> str:
        assert self.tokenizer is not None
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _prompt(self, request: GenerateInput) -> list[int]:
        if request.token_ids is not None:
            return list(request.token_ids)
        text = request.text
        if request.messages is not None:
            if self.chat_template is None:
                raise InvalidArgument(f"model {self.spec.name!r} has no chat template", field="messages")
            text = self.chat_template.render(request.messages, max_chars=MAX_PROMPT_CHARS_PER_TOKEN * self.context)
        if text is None:
            return []  # the engine refuses an empty prompt, naming the field
        if self.tokenizer is None:
            raise InvalidArgument(f"model {self.spec.name!r} has no {TOKENIZER_FILE}; send token_ids", field="text")
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    @property
    def context(self) -> int:
        return self.engine.max_model_len

    async def generate(self, request: GenerateInput) -> AsyncGenerator[Chunk, None]:
        """Stream the request's progress (or only its end when request.stream is False).

        The first chunk (the first token) and the last go out at once; in between, a stream sends one
        chunk per `streams / messages_per_second` seconds on average (the streams' chunks fall due
        together: LLMEngine.stream's `interval`) and the engine's progress meanwhile is merged into
        it, so a replica serving many streams sends several tokens a message instead of a message per
        token per engine step (each costs serialisation and a hop on both sides).
        """
        queue_seconds: float | None = max(0.0, time.time() - request.submitted_at) if request.submitted_at else None
        # Rendering a chat template is the one prompt step that may take a while: off the event loop.
        prompt = await asyncio.to_thread(self._prompt, request) if request.messages else self._prompt(request)
        params = request.params
        if params.adapter:  # the front's name for it -> the folder, which is the engine's name
            await asyncio.to_thread(self._use_adapter, request.adapter_path)
            params = dataclasses.replace(params, adapter=request.adapter_path)
        deltas = [TextDeltas(params.stop) for _ in range(params.n)]
        pace = (lambda: self.streams / self.messages_per_second) if self.messages_per_second else None
        self.streams += 1
        try:
            outputs = self.engine.stream(
                prompt, params, request_id=request.request_id, final_only=not request.stream, interval=pace
            )
            async for out in outputs:  # whole completions once, or progress at most once per `pace`
                yield chunk_of(out, deltas, whole=not request.stream, queue_seconds=queue_seconds)
                queue_seconds = None
        except LlmpError:
            raise
        except Exception as e:  # a failed step: the replica reports unhealthy and gets replaced
            self.failure = e
            raise
        finally:
            self.streams -= 1

    def stats(self) -> ReplicaStats:
        scheduler, cache = self.engine.scheduler, self.engine.cache
        return ReplicaStats(
            replica_id=self.replica_id,
            running=len(scheduler.running),
            waiting=len(scheduler.waiting),
            kv_cache_usage=cache.usage,
            kv_cache_blocks=cache.num_blocks,
            max_model_len=self.engine.max_model_len,
            load_seconds=self.load_seconds,
            bytes_per_parameter=self.bytes_per_parameter,
        )

    def check_health(self) -> None:
        if self.failure is not None:
            raise RuntimeError(f"the engine failed: {self.failure!r}")

    def close(self) -> None:
        """Nothing to stop: the engine's step thread ends once the engine is collected."""


def chunk_of(out: RequestOutput, deltas: list[TextDeltas], *, whole: bool, queue_seconds: float | None) -> Chunk:
    """An engine output as a chunk: what each completion gained since the last one, or all of it."""
    completions = []
    for c, text in zip(out.outputs, deltas, strict=True):
        new = c.token_ids if whole else c.new_token_ids
        logprobs = c.logprobs[len(c.logprobs) - len(new) :]  # one per token when asked for, else none
        finished = c.finish_reason is not None
        completions.append(
            CompletionChunk(
                c.index,
                text.take(c.text, finished),
                list(new),
                logprobs,
                c.finish_reason,
                c.num_draft_tokens,
                c.num_accepted_tokens,
            )
        )
    return Chunk(
        request_id=out.request_id,
        completions=completions,
        prompt_tokens=len(out.prompt_token_ids),
        cached_tokens=out.num_cached_tokens,
        completion_tokens=sum(len(c.token_ids) for c in out.outputs),
        finished=out.finished,
        queue_seconds=queue_seconds,
    )
