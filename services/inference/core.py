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
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from libs.common.artifacts import ArtifactStore, check_name
from libs.common.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from services.inference import metrics
from services.inference.config import InferenceConfig
from services.inference.engine import SamplingLimits
from services.inference.model_server import ModelServer, describe_model
from services.inference.schema import (
    Chunk,
    CompletionChunk,
    GenerateInput,
    ModelFacts,
    ModelLoad,
    ModelSpec,
    ModelStatus,
    ReplicaStats,
)

T = TypeVar("T")


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
        self._models: dict[str, _Served] = {}
        self._aborts: dict[str, asyncio.Event] = {}
        self._idle = asyncio.Event()
        self._idle.set()

    # -- models -----------------------------------------------------------------------------------
    async def load_model(self, spec: ModelSpec) -> ModelStatus:
        """Check the folder and options, deploy, and register the model under its name."""
        check_name(spec.name, "name")
        if spec.name in self._models:
            raise AlreadyExists(f"model {spec.name!r} is loaded; unload it first", field="name")
        check_options(spec)
        facts = await asyncio.to_thread(describe_model, self.store, spec.path, spec.engine)
        self._models[spec.name] = _Served(spec, facts, _Pending())
        try:
            self._models[spec.name].handle = await self.backend.deploy(spec)
        except BaseException:
            del self._models[spec.name]
            raise
        return await self.model_info(spec.name)

    async def unload_model(self, name: str) -> None:
        self._served(name)
        await self.backend.remove(name)
        del self._models[name]
        metrics.record_replicas(name, [])

    async def model_info(self, name: str) -> ModelStatus:
        served = self._served(name)
        served.stats = await served.handle.stats()
        metrics.record_replicas(name, served.stats)
        context = min((s.max_model_len for s in served.stats), default=served.facts.context_length)
        return ModelStatus(served.spec, served.facts, ModelLoad.of(served.stats, served.in_flight), context)

    def model_names(self) -> list[str]:
        return sorted(self._models)

    async def list_models(self) -> list[ModelStatus]:
        return [await self.model_info(name) for name in sorted(self._models)]

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
        last: Chunk | None = None
        try:
            async for last in _until_set(abort, served.handle.stream(request)):
                timer.chunk(last)
                yield last
            if last is None or not last.finished:
                last = aborted(request, last, timer.tokens)
                yield last
        finally:
            self._release(served, request.request_id)
            timer.done([c.finish_reason or "abort" for c in last.completions] if last else ["abort"])

    async def generate(self, model: str, request: GenerateInput) -> Chunk:
        """Run the request to its end; the one chunk holds whole completions."""
        chunks = [c async for c in self.stream(model, dataclasses.replace(request, stream=False))]
        return chunks[-1]

    def abort(self, request_id: str) -> None:
        event = self._aborts.get(request_id)
        if event is None:
            raise NotFound(f"no request {request_id!r} is running", field="request_id")
        event.set()

    def _admit(self, served: _Served, request: GenerateInput) -> GenerateInput:
        """Check what can be checked here, then count the request in; no replica has seen it yet."""
        if not (request.text or request.token_ids):
            raise InvalidArgument("must not be empty: give text or token_ids", field="prompt")
        if request.token_ids and not all(0 <= t < served.facts.vocab_size for t in request.token_ids):
            raise InvalidArgument(f"token ids must be in [0, {served.facts.vocab_size})", field="token_ids")
        request.params.validate(served.facts.vocab_size, self.limits)
        rid = request.request_id or uuid.uuid4().hex
        if rid in self._aborts:
            raise AlreadyExists(f"a request {rid!r} is running", field="request_id")
        if served.in_flight >= served.capacity:
            raise ResourceExhausted(f"model {served.spec.name!r} is at capacity ({served.capacity} requests)")
        served.in_flight += 1
        self._aborts[rid] = asyncio.Event()
        self._idle.clear()
        return dataclasses.replace(request, request_id=rid, submitted_at=time.time())

    def _release(self, served: _Served, request_id: str) -> None:
        served.in_flight -= 1
        del self._aborts[request_id]
        if not self._aborts:
            self._idle.set()

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.backend.start()

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


def check_options(spec: ModelSpec) -> None:
    r, e = spec.replicas, spec.engine
    checks = [
        (r.max_replicas >= max(1, r.min_replicas), "replicas.max_replicas", "must be >= 1 and >= min_replicas"),
        (r.max_ongoing_requests >= 1, "replicas.max_ongoing_requests", "must be >= 1"),
        (r.max_queued_requests >= 0, "replicas.max_queued_requests", "must be >= 0"),
        (r.target_ongoing_requests >= 0, "replicas.target_ongoing_requests", "must be >= 0"),
        (r.num_cpus >= 0 and r.num_gpus >= 0, "replicas.num_cpus", "resources must be >= 0"),
        (e.kv_cache_bytes > 0, "engine.kv_cache_bytes", "must be > 0"),
        (e.max_num_seqs >= 1 and e.max_num_batched_tokens >= 1, "engine.max_num_seqs", "batch limits must be >= 1"),
    ]
    for ok, name, message in checks:
        if not ok:
            raise InvalidArgument(message, field=name)


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
