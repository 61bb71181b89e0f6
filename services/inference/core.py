"""The inference service's core: which models are served, and requests streamed through them.

`InferenceCore` knows nothing of gRPC or Ray. It holds the served models, each behind a
`ModelHandle` made by a `Backend`: `LocalBackend` (here) runs a `ModelServer` in this process,
`ServeBackend` (serve_app.py) a Ray Serve deployment per model. Both give the same answers;
tests run the same calls through each.

What the core adds on top of a handle: requests are checked before any replica sees them
(unknown model, empty prompt, sampling values, caps), admission control (a model takes at most
max_ongoing_requests x max_replicas + max_queued_requests requests at once; more are refused with
RESOURCE_EXHAUSTED), request ids for Abort, the front's metrics, and a drain that waits for
running requests.

LoadModel is bounded by the operator's caps (InferenceConfig: replicas, CPUs, GPUs, memory, KV
cache, batch sizes, drafter settings; LLMP_INFERENCE_MAX_*) and a deploy timeout, and reserves
the model's name before its first await, so two loads of one name cannot both deploy.

Managed models (`managed_models`, set by the chart): in a cluster, KubeRay owns the Serve config
and deploys the models the RayService declares. The core attaches to them at start (the backend
finds each by its name, without waiting: the Ray head, and this process beside it, must be ready
before KubeRay deploys anything) and refuses LoadModel and UnloadModel for them with
FAILED_PRECONDITION, so the API never redeploys over the cluster's config.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import psutil

from libs.common.artifacts import ArtifactStore, check_name
from libs.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    LlmpError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from libs.common.planning.memory import GIB
from services.inference import metrics
from services.inference.config import InferenceConfig
from services.inference.engine import SAMPLERS, SamplingLimits, SamplingParams
from services.inference.engine.kv_cache import KVCacheConfig
from services.inference.engine.lora import adapter_dir
from services.inference.engine.lora import read_config as read_adapter_config
from services.inference.model_server import ModelServer, describe_model, plugin_spec
from services.inference.prompting import check_messages
from services.inference.schema import (
    Chunk,
    CompletionChunk,
    GenerateInput,
    ModelFacts,
    ModelLoad,
    ModelSpec,
    ModelStatus,
    ReplicaStats,
    model_spec_of,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
KV_BLOCK_TOKENS = KVCacheConfig().block_size
MAX_NGRAM = 64
"""Longest n-gram an n-gram drafter may match."""


class ModelHandle(Protocol):
    """One served model, wherever its replicas run."""

    def stream(self, request: GenerateInput) -> AsyncGenerator[Chunk, None]:
        """The request's chunks; closing the generator early aborts the request."""
        ...

    async def stats(self) -> list[ReplicaStats]:
        """The latest report of every live replica."""
        ...


class Backend(Protocol):
    name: str
    dashboard_url: str

    async def start(self) -> None: ...

    async def deploy(self, spec: ModelSpec) -> ModelHandle: ...

    async def attach(self, spec: ModelSpec) -> ModelHandle:
        """A model deployed by someone else (the cluster's Serve config), found by its name; returns at once."""
        ...

    async def remove(self, name: str) -> None: ...

    async def close(self) -> None: ...


class LocalModel:
    """A model served by one in-process ModelServer."""

    def __init__(self, server: ModelServer) -> None:
        self.server = server

    def stream(self, request: GenerateInput) -> AsyncGenerator[Chunk, None]:
        return self.server.generate(request)

    async def stats(self) -> list[ReplicaStats]:
        return [self.server.stats()]


class LocalBackend:
    """Models loaded into this process: no Ray, one 'replica' each (tests, development)."""

    name = "local"
    dashboard_url = ""

    def __init__(self, store: ArtifactStore, limits: SamplingLimits) -> None:
        self.store, self.limits = store, limits

    async def start(self) -> None:
        return None

    async def deploy(self, spec: ModelSpec) -> ModelHandle:
        return LocalModel(await asyncio.to_thread(ModelServer, spec, self.store, self.limits))

    async def attach(self, spec: ModelSpec) -> ModelHandle:
        """No one else serves models into this process: a managed model is loaded here, at start."""
        return await self.deploy(spec)

    async def remove(self, name: str) -> None:
        return None

    async def close(self) -> None:
        return None


@dataclass
class _Served:
    spec: ModelSpec
    facts: ModelFacts
    handle: ModelHandle
    in_flight: int = 0
    stats: list[ReplicaStats] = field(default_factory=list)
    adapters: dict[str, str] = field(default_factory=dict)
    """Served adapter name -> its folder in the artifact store."""
    drafted: int = 0
    accepted: int = 0
    cold_start: float = 0.0

    @property
    def capacity(self) -> int:
        r = self.spec.replicas
        return r.max_ongoing_requests * r.max_replicas + r.max_queued_requests


class InferenceCore:
    def __init__(self, config: InferenceConfig, store: ArtifactStore, backend: Backend) -> None:
        self.config = config
        self.store = store
        self.backend = backend
        self.limits = SamplingLimits(max_n=config.max_n, max_tokens=config.max_tokens)
        self.managed = managed_specs(config.managed_models)
        """Models the cluster's Serve config deploys, by name: attached at start, never loaded or unloaded here."""
        self._models: dict[str, _Served] = {}
        self._aborts: dict[str, asyncio.Event] = {}
        self._adapter_of: dict[str, str] = {}  # running request id -> its adapter
        self._idle = asyncio.Event()
        self._idle.set()

    # -- models -----------------------------------------------------------------------------------
    async def load_model(self, spec: ModelSpec) -> ModelStatus:
        """Check the folder and options, deploy, and register the model under its name.

        The name is taken before the first await (and given back if the load fails), so a second
        load of it meanwhile is refused with ALREADY_EXISTS instead of deploying twice.
        """
        check_name(spec.name, "name")
        self._check_unmanaged(spec.name, "load", "name")
        if spec.name in self._models:
            raise AlreadyExists(f"model {spec.name!r} is loaded or loading; unload it first", field="name")
        check_options(spec, self.config)
        served = self._models[spec.name] = _Served(spec, PENDING_FACTS, _Pending())
        try:
            served.facts = await asyncio.to_thread(describe_model, self.store, spec.path, spec.engine)
            check_memory(spec, served.facts, self.config.max_replica_memory_bytes)
            served.handle = await self._deploy(spec)
        except BaseException:
            del self._models[spec.name]
            raise
        return await self.model_info(spec.name)

    async def _attach(self, spec: ModelSpec) -> None:
        """Register a managed model: its folder read here, its replicas wherever the cluster runs them."""
        check_name(spec.name, "name")
        check_options(spec, self.config)
        facts = await asyncio.to_thread(describe_model, self.store, spec.path, spec.engine)
        self._models[spec.name] = _Served(spec, facts, await self.backend.attach(spec))

    def _check_unmanaged(self, name: str, action: str, field: str) -> None:
        if name in self.managed:
            raise FailedPrecondition(
                f"model {name!r} is deployed by the cluster's Serve config (the RayService; the chart's "
                f"inference.models) and cannot be {action}ed through this API; change it there",
                field=field,
            )

    async def _deploy(self, spec: ModelSpec) -> ModelHandle:
        """The backend's deploy within deploy_timeout_seconds; past it, what was started is removed."""
        timeout = self.config.deploy_timeout_seconds
        try:
            return await asyncio.wait_for(self.backend.deploy(spec), timeout)
        except TimeoutError:
            await self.backend.remove(spec.name)
            raise Unavailable(f"model {spec.name!r} did not deploy within {timeout:g} s") from None

    async def unload_model(self, name: str) -> None:
        self._check_unmanaged(name, "unload", "model")
        self._served(name)
        await self.backend.remove(name)
        del self._models[name]
        metrics.record_replicas(name, [])

    async def model_info(self, name: str) -> ModelStatus:
        served = self._served(name)
        served.stats = await served.handle.stats()
        metrics.record_replicas(name, served.stats)
        context = min((s.max_model_len for s in served.stats), default=served.facts.context_length)
        load = ModelLoad.of(served.stats, served.in_flight, served.drafted, served.accepted, served.cold_start)
        return ModelStatus(served.spec, served.facts, load, context, tuple(sorted(served.adapters)))

    async def load_adapter(self, model: str, name: str, path: str) -> ModelStatus:
        """Serve the peft adapter folder `path` as `name` on `model`; replicas load it on first use."""
        served = self._served(model)
        check_name(name, "name")
        if name in served.adapters:
            raise AlreadyExists(f"adapter {name!r} is loaded on {model!r}; unload it first", field="name")
        directory = await asyncio.to_thread(adapter_dir, path, self.store)
        await asyncio.to_thread(read_adapter_config, directory)  # refuses what the engine cannot serve
        served.adapters[name] = self.store.relative(directory)
        return await self.model_info(model)

    async def unload_adapter(self, model: str, name: str) -> ModelStatus:
        served = self._served(model)
        if name not in served.adapters:
            raise NotFound(f"no adapter {name!r} is loaded on {model!r}", field="name")
        if any(a == name for a in self._adapter_of.values()):
            raise FailedPrecondition(f"adapter {name!r} is in use by running requests", field="name")
        del served.adapters[name]
        return await self.model_info(model)

    def model_names(self) -> list[str]:
        """Models that are loaded (not those still deploying)."""
        return sorted(name for name, served in self._models.items() if not isinstance(served.handle, _Pending))

    async def list_models(self) -> list[ModelStatus]:
        return [await self.model_info(name) for name in self.model_names()]

    def _served(self, name: str) -> _Served:
        served = self._models.get(name)
        if served is None or isinstance(served.handle, _Pending):
            raise NotFound(f"no model {name!r} is loaded", field="model")
        return served

    # -- requests ---------------------------------------------------------------------------------
    async def stream(self, model: str, request: GenerateInput) -> AsyncIterator[Chunk]:
        """The request's chunks, the last one finished; Abort ends it with finish_reason "abort"."""
        served = self._served(model)
        request = self._admit(served, request)
        abort = self._aborts[request.request_id]
        timer = metrics.RequestTimer(model, request.stream)
        # A model allowed to scale to zero may have no replica: this request then waits for one to start.
        cold = served.spec.replicas.min_replicas == 0 and not await served.handle.stats()
        last: Chunk | None = None
        try:
            async for last in _until_set(abort, served.handle.stream(request)):
                if cold:
                    served.cold_start = timer.elapsed()
                    metrics.COLD_START.labels(model).observe(served.cold_start)
                    cold = False
                timer.chunk(last)
                yield last
            if last is None or not last.finished:
                last = aborted(request, last, timer.tokens)
                yield last
        finally:
            self._release(served, request.request_id)
            if last is not None:
                served.drafted += sum(c.draft_tokens for c in last.completions)
                served.accepted += sum(c.accepted_draft_tokens for c in last.completions)
            timer.done(last)

    async def generate(self, model: str, request: GenerateInput) -> Chunk:
        """Run the request to its end; the one chunk holds whole completions."""
        chunks = [c async for c in self.stream(model, dataclasses.replace(request, stream=False))]
        return chunks[-1]

    def abort(self, request_id: str) -> None:
        event = self._aborts.get(request_id)
        if event is None:
            raise NotFound(f"no request {request_id!r} is running", field="request_id")
        event.set()

    def sampling_defaults(self, model: str) -> SamplingParams:
        """What a request's unset sampling fields take: the model's generation_config.json, else the engine's."""
        served = self._models.get(model)
        return served.facts.sampling_defaults if served is not None else SamplingParams()

    def _admit(self, served: _Served, request: GenerateInput) -> GenerateInput:
        """Check what can be checked here, then count the request in; no replica has seen it yet."""
        if request.messages is not None:
            check_messages(request.messages)
            if not served.facts.has_chat_template:
                raise InvalidArgument(f"model {served.spec.name!r} has no chat template", field="messages")
        elif not (request.text or request.token_ids):
            raise InvalidArgument("must not be empty: give text, token_ids or messages", field="prompt")
        if request.token_ids and not all(0 <= t < served.facts.vocab_size for t in request.token_ids):
            raise InvalidArgument(f"token ids must be in [0, {served.facts.vocab_size})", field="token_ids")
        request.params.validate(served.facts.vocab_size, self.limits)
        for spec in request.params.processors:  # known and allowed; built only on the replica
            SAMPLERS.get(str(spec.get("type", "")), field="processors.type")
        adapter = request.params.adapter
        if adapter and adapter not in served.adapters:
            raise NotFound(f"no adapter {adapter!r} is loaded on {served.spec.name!r}", field="adapter")
        rid = request.request_id or uuid.uuid4().hex
        if rid in self._aborts:
            raise AlreadyExists(f"a request {rid!r} is running", field="request_id")
        if served.in_flight >= served.capacity:
            raise ResourceExhausted(f"model {served.spec.name!r} is at capacity ({served.capacity} requests)")
        served.in_flight += 1
        self._aborts[rid] = asyncio.Event()
        self._idle.clear()
        if adapter:
            self._adapter_of[rid] = adapter
        path = served.adapters.get(adapter or "", "")
        return dataclasses.replace(request, request_id=rid, submitted_at=time.time(), adapter_path=path)

    def _release(self, served: _Served, request_id: str) -> None:
        served.in_flight -= 1
        del self._aborts[request_id]
        self._adapter_of.pop(request_id, None)
        if not self._aborts:
            self._idle.set()

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the backend and attach the managed models; one that cannot be served is logged and left out."""
        await self.backend.start()
        for spec in self.managed.values():
            try:
                await self._attach(spec)
            except LlmpError as e:
                log.error("managed model %s is not served: %s", spec.name, e)

    async def drain(self) -> None:
        """Let running requests finish within drain_seconds, then release the backend."""
        try:
            await asyncio.wait_for(self._idle.wait(), self.config.drain_seconds)
        except TimeoutError:
            for event in self._aborts.values():
                event.set()
        await self.backend.close()


class _Pending:
    """Stands in for the handle of a model that is being deployed, so its name stays reserved."""

    def stream(self, request: GenerateInput) -> AsyncGenerator[Chunk, None]:
        raise NotImplementedError

    async def stats(self) -> list[ReplicaStats]:
        return []


def managed_specs(setting: str) -> dict[str, ModelSpec]:
    """The models of `managed_models` (a JSON list of build_app args) by name; bad data names the field."""
    where = "inference.managed_models"
    if not setting.strip():
        return {}
    try:
        items = json.loads(setting)
    except json.JSONDecodeError as e:
        raise InvalidArgument(f"is not JSON: {e}", field=where) from None
    if not isinstance(items, list):
        raise InvalidArgument("must be a JSON list of models", field=where)
    specs = [model_spec_of(item, f"{where}[{i}]") for i, item in enumerate(items)]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise InvalidArgument(f"names a model twice: {names}", field=where)
    return {s.name: s for s in specs}


PENDING_FACTS = ModelFacts(model_type="", vocab_size=0, context_length=0, has_tokenizer=False)
"""What a model being deployed is known by until its folder has been read."""


def check_options(spec: ModelSpec, config: InferenceConfig) -> None:
    """Refuse replica and engine options outside their ranges or the operator's caps, naming the field."""
    r, e = spec.replicas, spec.engine
    checks = [
        (r.max_replicas >= max(1, r.min_replicas), "replicas.max_replicas", "must be >= 1 and >= min_replicas"),
        (r.max_replicas <= config.max_replicas, "replicas.max_replicas", f"must be <= {config.max_replicas}"),
        (
            1 <= r.max_ongoing_requests <= config.max_ongoing_requests,
            "replicas.max_ongoing_requests",
            f"must be in [1, {config.max_ongoing_requests}]",
        ),
        (
            0 <= r.max_queued_requests <= config.max_ongoing_requests,
            "replicas.max_queued_requests",
            f"must be in [0, {config.max_ongoing_requests}]",
        ),
        (
            _within(r.target_ongoing_requests, 0, r.max_ongoing_requests),
            "replicas.target_ongoing_requests",
            "must be in [0, max_ongoing_requests]",
        ),
        (
            _within(r.num_cpus, 0, config.max_replica_cpus),
            "replicas.num_cpus",
            f"must be in [0, {config.max_replica_cpus}]",
        ),
        (
            _within(r.num_gpus, 0, config.max_replica_gpus),
            "replicas.num_gpus",
            f"must be in [0, {config.max_replica_gpus}]",
        ),
        (
            r.memory_bytes <= config.max_replica_memory_bytes,
            "replicas.memory_bytes",
            f"must be <= {config.max_replica_memory_bytes}",
        ),
        (
            0 < e.kv_cache_bytes <= config.max_kv_cache_bytes,
            "engine.kv_cache_bytes",
            f"must be in [1, {config.max_kv_cache_bytes}]",
        ),
        (1 <= e.max_num_seqs <= config.max_num_seqs, "engine.max_num_seqs", f"must be in [1, {config.max_num_seqs}]"),
        (
            1 <= e.max_num_batched_tokens <= config.max_num_batched_tokens,
            "engine.max_num_batched_tokens",
            f"must be in [1, {config.max_num_batched_tokens}]",
        ),
    ]
    if e.sliding_window is not None and e.sliding_window < 1:
        raise InvalidArgument("must be >= 1 token (or unset: the model's own window)", field="engine.sliding_window")
    for ok, name, message in checks:
        if not ok:
            raise InvalidArgument(message, field=name)
    check_drafter(plugin_spec(e.speculative, "engine.speculative"), config)


def check_drafter(spec: dict[str, Any] | str | None, config: InferenceConfig) -> None:
    """A drafter's sizes within the caps: tokens per step, n-gram lengths, its own KV cache."""
    if not isinstance(spec, dict):
        return  # off, or a bare name with its defaults
    caps = {"num_tokens": config.max_draft_tokens, "max_ngram": MAX_NGRAM, "min_ngram": MAX_NGRAM}
    for name, cap in caps.items():
        value = spec.get(name, 1)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= cap:
            raise InvalidArgument(f"must be an integer in [1, {cap}]", field=f"engine.speculative.{name}")
    kv = spec.get("kv_cache", {})
    memory = kv.get("memory_bytes", 1) if isinstance(kv, dict) else None
    if not isinstance(memory, int) or not 1 <= memory <= config.max_kv_cache_bytes or set(kv) - {"memory_bytes"}:
        raise InvalidArgument(
            f'must be {{"memory_bytes": n}} with n in [1, {config.max_kv_cache_bytes}]',
            field="engine.speculative.kv_cache",
        )


def _within(value: float, low: float, high: float) -> bool:
    return math.isfinite(value) and low <= value <= high


def check_memory(spec: ModelSpec, facts: ModelFacts, cap: int) -> None:
    """Refuse a model whose weights and KV cache cannot fit one replica's memory (the memory planner's figures)."""
    kv = spec.engine.kv_cache_bytes
    block = facts.kv_bytes_per_token * KV_BLOCK_TOKENS
    if kv < block:
        raise InvalidArgument(
            f"{kv} bytes hold no KV-cache block of {KV_BLOCK_TOKENS} tokens ({block} bytes)",
            field="engine.kv_cache_bytes",
        )
    budget = min(spec.replicas.memory_bytes or psutil.virtual_memory().available, cap)
    where = "replicas.memory_bytes" if spec.replicas.memory_bytes else "free memory on this node"
    need = facts.weight_bytes + facts.plain_copy_bytes + kv
    if need > budget:
        copy = facts.plain_copy_bytes
        copied = f"{copy / GIB:.2f} GiB of their plain copy for few-row steps (engine.packed_only drops it) + "
        raise ResourceExhausted(
            f"model {spec.name!r} needs {need / GIB:.2f} GiB per replica: "
            f"{facts.weight_bytes / GIB:.2f} GiB of weights "
            f"({facts.parameters:,} parameters as {spec.engine.quantization or spec.engine.dtype}) + "
            f"{copied if copy else ''}"
            f"{kv / GIB:.2f} GiB of KV cache ({kv // facts.kv_bytes_per_token:,} tokens); {where} "
            f"(at most {cap / GIB:.2f} GiB) is {budget / GIB:.2f} GiB",
            field="replicas.memory_bytes",
        )


def aborted(request: GenerateInput, last: Chunk | None, generated: int) -> Chunk:
    """The final chunk of a request stopped by Abort."""
    return Chunk(
        request_id=request.request_id,
        completions=[CompletionChunk(i, finish_reason="abort") for i in range(request.params.n)],
        prompt_tokens=last.prompt_tokens if last else 0,
        cached_tokens=last.cached_tokens if last else 0,
        completion_tokens=generated,
        finished=True,
    )


async def _until_set(event: asyncio.Event, items: AsyncGenerator[T, None]) -> AsyncIterator[T]:
    """`items` until `event` is set; then `items` is closed, which cancels the work behind it."""
    stop = asyncio.ensure_future(event.wait())
    pending: asyncio.Future[T] | None = None
    try:
        while True:
            pending = asyncio.ensure_future(anext(items))
            await asyncio.wait({pending, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not pending.done():
                return
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield item
    finally:
        stop.cancel()
        if pending is not None and not pending.done():
            pending.cancel()
            await asyncio.wait({pending})
        await items.aclose()
