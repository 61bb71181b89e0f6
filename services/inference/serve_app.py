"""Models as Ray Serve applications: one deployment per model, one engine per replica.

    backend = ServeBackend(store, limits, ray_num_cpus=0, dashboard=True, dashboard_port=8265, messages_per_second=200)
    await backend.start()                      # ray.init() locally, or attach to RAY_ADDRESS
    handle = await backend.deploy(ModelSpec("tiny", "models/tiny/1"))
    async for chunk in handle.stream(request): ...

Each model is the application `llmp-inference-<name>`: a `ModelDeployment` with autoscaling
between min and max replicas (0 allowed: the first request then waits for a cold start),
`max_ongoing_requests` per replica and `max_queued_requests` beyond them, so overload is refused
(Serve's BackPressureError becomes RESOURCE_EXHAUSTED) instead of queued forever; Serve calls
`check_health` and replaces a replica whose engine failed or whose engine process died. A replica
hosts one `ModelServer`, in a child process of its own (engine_process.ModelProcess: Ray's and
Serve's threads then never take the engine's GIL; the service's `engine_process` setting) or in its
own process; the engine's stream drives its step loop. Cancelling a handle call cancels the
replica's generator, which aborts the request in the engine.

Requests for one model that arrive together go to a replica in one call (GatheredCalls, at most
the service's `gather_requests`): a handle call costs the front milliseconds of CPU, more than a
small model's engine spends on a request.

Every streamed chunk is a Ray object: serialised, sent and read back in the front, a few hundred
microseconds of CPU on each side, which at a token per message costs more than the engine's step
for small models. A replica's streams therefore send at most `messages_per_second` chunks together
(the service's `stream_messages_per_second`), each carrying what the engine produced since the last
(ModelServer.generate); a stream's first and last chunks go at once.

Replicas report their load (running/waiting sequences, KV-cache usage) a few times a second to the
model's `StatsBoard`, a small named actor that the front process reads for GetModelInfo and the
metrics: a handle call cannot reach every replica, and would queue behind busy ones.

In a cluster the same application comes from a Serve config (the chart's RayService, which KubeRay
applies): `build_app` is its builder, named `services.inference.serve_app:build_app` with args
{name, path, replicas, engine}, and it builds exactly what `ServeBackend.deploy` does. The front
then `attach`es to that application by its name instead of deploying it:

    applications:
      - name: llmp-inference-tiny            # app_name("tiny")
        import_path: services.inference.serve_app:build_app
        args: {name: tiny, path: models/tiny/1, replicas: {max_replicas: 2}, engine: {quantization: int8}}
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
from ray.serve import Application
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RayServeException
from ray.serve.handle import DeploymentResponseGenerator

from libs.common.artifacts import ArtifactStore, check_name
from libs.common.config import CommonConfig, load
from libs.common.errors import LlmpError, ResourceExhausted, Unavailable
from libs.common.local_ray import remove_ray_temp_dir, start_local_ray
from libs.common.settings import llmp_home
from services.inference import metrics
from services.inference.config import InferenceConfig
from services.inference.core import check_options
from services.inference.engine import SamplingLimits
from services.inference.engine_process import ModelProcess
from services.inference.model_server import ModelServer
from services.inference.runtime import preload_env
from services.inference.schema import Chunk, GenerateInput, ModelSpec, ReplicaStats, model_spec_of

log = logging.getLogger(__name__)

NAMESPACE = "llmp-inference"
APP_PREFIX = "llmp-inference-"
REPORT_SECONDS = 0.25
"""How often a replica reports its load."""
STALE_SECONDS = 5.0
"""A replica silent this long is taken for gone."""
RequestKey = tuple[str, float]
"""A request as a gathered call knows it: (request_id, submitted_at). An id may be used again once
its request ended; with the time the front accepted it, an abort never reaches a later request."""
REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
"""Serve settings of a replica's process (its runtime_env). By default Serve runs a replica's code on
an event loop of its own thread: every request and every streamed chunk then hops between that
thread and the replica's main loop, and both take the GIL (which the engine's step thread needs when
it runs in the replica's process). Our code never blocks its loop (the engine steps in its own process
or thread, `ModelDeployment` loads there), so it shares the main loop. With backends.FRONT_ENV,
bench.inference_serving's 64 streams on two cores took about 15% less CPU in the replica and 30% less
in the front for the same tokens."""


def replica_env(preload: bool) -> dict[str, str]:
    """A replica's environment (its runtime_env's env_vars): REPLICA_ENV and, with `preload`, the
    native libraries its engine runs faster with (runtime.preload_env)."""
    return {**REPLICA_ENV, **(preload_env() if preload else {})}


@dataclass(frozen=True)
class Failed:
    """A gathered request that ended without its final chunk: its error, or None where it was stopped."""

    request_id: str
    error: Exception | None


async def _routed(response: Any) -> None:
    """Returns once Serve's router has sent the call to a replica (or failed to: the call's reader gets
    that). The router works on this event loop (backends.FRONT_ENV), a few milliseconds a call, and
    the requests that arrive meanwhile go together in the next call. Serve has no public way to await
    this; where its handle lacks the method, one turn of the loop is all the wait."""
    routed = getattr(response, "_fetch_future_result_async", None)
    if routed is None:
        await asyncio.sleep(0)
        return
    routing = asyncio.ensure_future(routed())
    await asyncio.wait({routing})  # a failed or cancelled call is its reader's to report
    if not routing.cancelled():
        routing.exception()


def app_name(model: str) -> str:
    return APP_PREFIX + model


def board_name(model: str) -> str:
    return f"{APP_PREFIX}{model}-stats"


@ray.remote(num_cpus=0)
class StatsBoard:
    """The latest load report of each replica of one model, and the requests of gathered calls that
    the front stopped (GatheredCalls): each replica takes them with its next report."""

    def __init__(self) -> None:
        self.reports: dict[str, tuple[float, ReplicaStats]] = {}
        self.aborts: dict[RequestKey, float] = {}

    def report(self, stats: ReplicaStats) -> list[RequestKey]:
        """Records the replica's load; returns the requests to stop, of which it holds any or none."""
        now = time.monotonic()
        self.reports[stats.replica_id] = (now, stats)
        self.aborts = {key: at for key, at in self.aborts.items() if now - at < STALE_SECONDS}
        return list(self.aborts)

    def abort(self, key: RequestKey) -> None:
        self.aborts[key] = time.monotonic()

    def current(self) -> list[ReplicaStats]:
        now = time.monotonic()
        self.reports = {k: v for k, v in self.reports.items() if now - v[0] < STALE_SECONDS}
        return [stats for _, stats in self.reports.values()]


def stats_board(model: str) -> Any:
    """The model's board, made by whichever comes first: the front or a replica (of a Serve config's app)."""
    return StatsBoard.options(  # type: ignore[attr-defined]
        name=board_name(model), namespace=NAMESPACE, get_if_exists=True, lifetime="detached"
    ).remote()


@serve.deployment(health_check_period_s=5, health_check_timeout_s=30, graceful_shutdown_timeout_s=30)
class ModelDeployment:
    """One replica: a ModelServer, and a thread that reports its load to the model's board."""

    async def __init__(  # type: ignore[misc]  # Serve awaits an async __init__; mypy wants a plain one
        self,
        spec: ModelSpec,
        artifacts_root: str,
        limits: SamplingLimits,
        messages_per_second: float,
        engine_process: bool = True,
    ) -> None:
        """Loads in a child process (`engine_process`, the service's setting) or a worker thread: either
        way the replica's event loop (REPLICA_ENV) keeps answering Serve meanwhile."""
        replica = serve.get_replica_context().replica_id.unique_id
        self.server: ModelServer | ModelProcess
        if engine_process:
            self.server = await ModelProcess.start(
                spec, artifacts_root, limits, replica, messages_per_second=messages_per_second
            )
        else:
            store = ArtifactStore(artifacts_root)
            self.server = await asyncio.to_thread(
                ModelServer, spec, store, limits, replica, messages_per_second=messages_per_second
            )
        self.board = stats_board(spec.name)
        self.loop = asyncio.get_running_loop()
        self.gathered: dict[RequestKey, asyncio.Task[None]] = {}
        """The requests of this replica's gathered calls, by key, for the aborts the board relays."""
        self._stop = threading.Event()
        threading.Thread(target=self._report, name="llmp-stats", daemon=True).start()
        log.info("replica %s of %s loaded in %.2fs", replica, spec.name, self.server.load_seconds)

    async def generate(self, request: GenerateInput) -> AsyncGenerator[Chunk, None]:
        async for chunk in self.server.generate(request):
            yield chunk

    async def generate_many(self, requests: list[GenerateInput]) -> AsyncGenerator[list[Chunk | Failed], None]:
        """Several requests in one call (GatheredCalls): each message holds every chunk produced since the
        last, of any of them, or a request's error (Failed), which ends that request only. Cancelling the
        call stops all of them; one of them is stopped by an abort relayed by the board."""
        ready: asyncio.Queue[Chunk | Failed] = asyncio.Queue()

        async def run(request: GenerateInput) -> None:
            try:
                async with contextlib.aclosing(self.server.generate(request)) as chunks:
                    async for chunk in chunks:
                        ready.put_nowait(chunk)
            except asyncio.CancelledError:
                ready.put_nowait(Failed(request.request_id, None))
                raise
            except Exception as e:
                ready.put_nowait(Failed(request.request_id, e))

        keys = [(r.request_id, r.submitted_at) for r in requests]
        for key, request in zip(keys, requests, strict=True):
            self.gathered[key] = asyncio.create_task(run(request))
        try:
            left = len(requests)
            while left:
                items = [await ready.get()]
                while not ready.empty():
                    items.append(ready.get_nowait())
                left -= sum(1 for item in items if isinstance(item, Failed) or item.finished)
                yield items
        finally:
            tasks = [self.gathered.pop(key) for key in keys]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _abort(self, keys: list[RequestKey]) -> None:
        for key in keys:
            task = self.gathered.get(key)
            if task is not None:
                task.cancel()

    async def complete(self, request: GenerateInput) -> Chunk:
        """A request sent whole (`request.stream` False): its one chunk as a plain reply, which costs Ray
        less than a stream of one; cancelling the call closes the generator, which aborts the request."""
        async with contextlib.aclosing(self.server.generate(request)) as chunks:
            replies = [chunk async for chunk in chunks]  # one: the engine reports a whole request's end only
        return replies[-1]

    def check_health(self) -> None:
        self.server.check_health()

    def _report(self) -> None:
        while not self._stop.wait(REPORT_SECONDS):
            try:
                aborts = ray.get(self.board.report.remote(self.server.stats()), timeout=STALE_SECONDS)
            except Exception:  # the board is being replaced, or Ray is shutting down: report next time
                log.debug("could not report to the stats board", exc_info=True)
                continue
            if aborts and self.gathered:
                self.loop.call_soon_threadsafe(self._abort, aborts)

    def __del__(self) -> None:
        """Stop reporting and stop the engine (its process, where it has one); a replica that failed to
        load has neither."""
        if hasattr(self, "_stop"):
            self._stop.set()
        if hasattr(self, "server"):
            self.server.close()


def deployment_options(spec: ModelSpec, preload: bool = True) -> dict[str, Any]:
    """Serve options of the model's deployment (Serve needs max_queued_requests >= 1 or -1); `preload`:
    the inference config's cpu_preload."""
    r = spec.replicas
    target = r.target_ongoing_requests or max(1.0, r.max_ongoing_requests / 2)
    return {
        "name": "model",
        "autoscaling_config": {
            "min_replicas": r.min_replicas,
            "max_replicas": r.max_replicas,
            "target_ongoing_requests": target,
        },
        "max_ongoing_requests": r.max_ongoing_requests,
        # 0 cannot be said to Serve; the front's admission control then holds the bound.
        "max_queued_requests": r.max_queued_requests or -1,
        # A log line per request, written in the replica's process with its GIL (about 3% of a busy
        # replica's time); the front's metrics count and time every request instead.
        "logging_config": {"enable_access_log": False},
        "ray_actor_options": {
            "num_cpus": r.num_cpus,
            "num_gpus": r.num_gpus,
            **({"memory": r.memory_bytes} if r.memory_bytes else {}),
            "runtime_env": {"env_vars": replica_env(preload)},
        },
    }


def model_app(
    spec: ModelSpec,
    artifacts_root: str,
    limits: SamplingLimits,
    messages_per_second: float,
    preload: bool = True,
    engine_process: bool = True,
) -> Application:
    """The model's Serve application: one ModelDeployment with the spec's deployment_options."""
    deployment = ModelDeployment.options(**deployment_options(spec, preload))  # type: ignore[attr-defined]
    return deployment.bind(spec, artifacts_root, limits, messages_per_second, engine_process)


def build_app(args: dict[str, Any]) -> Application:
    """Serve application builder for a Serve config: args are a ModelSpec as data (model_spec_of),
    checked as LoadModel checks them (the LLMP_INFERENCE_* caps); the store is LLMP_HOME's."""
    spec = model_spec_of(args, "args")
    check_name(spec.name, "args.name")
    config = load(InferenceConfig, "inference")
    check_options(spec, config)
    limits = SamplingLimits(max_n=config.max_n, max_tokens=config.max_tokens)
    artifacts = str(load(CommonConfig, "common").artifacts_path)
    return model_app(
        spec, artifacts, limits, config.stream_messages_per_second, config.cpu_preload, config.engine_process
    )


def domain_error(error: BaseException) -> BaseException:
    """A Ray or Serve failure as the llmp error a caller should see (others unchanged)."""
    cause = error.cause if isinstance(error, RayTaskError) else error
    if isinstance(cause, LlmpError):
        return cause
    if isinstance(cause, BackPressureError):
        return ResourceExhausted(f"the model's replicas are busy and its queue is full ({cause.message})")
    if isinstance(cause, DeploymentUnavailableError | ActorDiedError | ActorUnavailableError):
        return Unavailable(f"the model's replicas are unavailable: {cause}")
    return error


class ServeModel:
    """A model served by its Ray Serve application, through a deployment handle (None: found on first use).

    Requests that arrive together go to a replica together: `gather` at most in one handle call
    (GatheredCalls); 1 sends each alone."""

    def __init__(self, name: str, handle: Any, board: Any, gather: int = 1) -> None:
        self.name, self.handle, self.board = name, handle, board
        self.calls = GatheredCalls(name, board, gather)

    async def _handle(self) -> Any:
        if self.handle is None:
            try:
                self.handle = await asyncio.to_thread(serve.get_app_handle, app_name(self.name))
            except RayServeException:
                raise Unavailable(
                    f"model {self.name!r} is not deployed yet: the cluster's Serve config has no running "
                    f"application {app_name(self.name)!r}"
                ) from None
        return self.handle

    async def stream(self, request: GenerateInput) -> AsyncGenerator[Chunk, None]:
        handle = await self._handle()
        async for chunk in self.calls.stream(handle, request):
            yield chunk

    async def stats(self) -> list[ReplicaStats]:
        return await self.board.current.remote()


Inbox = asyncio.Queue[Chunk | BaseException | None]
"""A request's chunks as its call delivers them; an error ends it, and so does None (stopped or cut off)."""


@dataclass
class _Call:
    """One handle call of GatheredCalls: its requests' inboxes by request id, and those not yet finished."""

    response: Any = None
    inboxes: dict[str, Inbox] = field(default_factory=dict)
    open: set[str] = field(default_factory=set)


@dataclass(eq=False)
class _Request:
    request: GenerateInput
    inbox: Inbox = field(default_factory=asyncio.Queue)
    call: _Call | None = None


class GatheredCalls:
    """Sends the requests of one model that arrive together as one handle call.

    A handle call costs the front's event loop a few milliseconds of CPU (Serve's router picks a
    replica, the call is serialised and submitted, its replies come back one Ray object each), which
    for a small model is more than the engine spends on the request. Requests are therefore queued
    and sent by one task: all those waiting, up to `gather` a call, go to one replica
    (`ModelDeployment.generate_many`), whose messages carry the chunks of all of them; a lone request
    goes alone, streamed (`generate`) or whole (`complete`). While a call is being routed, the
    requests that arrive wait for the next one: nothing waits on purpose, so a request that arrives
    alone goes at once.

    Stopping a request (its caller went away, or Abort) cancels its call where it is the call's last
    unfinished request; otherwise the model's board relays the abort to the replicas, which take it
    with their next load report (within REPORT_SECONDS).

    Serve counts a call as one request: a replica's max_ongoing_requests and the autoscaler's
    target_ongoing_requests count calls, which may carry up to `gather` requests each (the front's
    admission control still bounds the model's requests). Set `gather` to 1 (the service's
    `gather_requests`) where they must count requests."""

    def __init__(self, model: str, board: Any, gather: int) -> None:
        self.model, self.board, self.gather = model, board, max(1, gather)
        self.waiting: list[_Request] = []
        self.sender: asyncio.Task[None] | None = None
        self.pumps: set[asyncio.Task[None]] = set()

    async def stream(self, handle: Any, request: GenerateInput) -> AsyncGenerator[Chunk, None]:
        entry = _Request(request)
        self.waiting.append(entry)
        if self.sender is None or self.sender.done():
            self.sender = asyncio.create_task(self._send(handle))
        finished = False
        try:
            while not finished:
                item = await entry.inbox.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise domain_error(item) from None
                finished = item.finished
                yield item
        finally:
            if not finished:
                self._stop(entry)

    def _stop(self, entry: _Request) -> None:
        request, call = entry.request, entry.call
        if call is None:  # not sent yet
            self.waiting.remove(entry)
            return
        call.inboxes.pop(request.request_id, None)
        if request.request_id not in call.open:  # its call already ended it
            return
        call.open.discard(request.request_id)
        if not call.open:
            call.response.cancel()
        else:
            self.board.abort.remote((request.request_id, request.submitted_at))

    async def _send(self, handle: Any) -> None:
        """Sends what waits, a call per `gather` requests, until nothing does. It lets the event loop
        turn before the first call and waits for each call's routing before the next (_routed), so
        requests that arrive meanwhile go together."""
        while self.waiting:
            await asyncio.sleep(0)
            batch, self.waiting = self.waiting[: self.gather], self.waiting[self.gather :]
            if not batch:
                continue
            requests = [entry.request for entry in batch]
            call = _Call(
                inboxes={entry.request.request_id: entry.inbox for entry in batch},
                open={r.request_id for r in requests},
            )
            try:
                if len(requests) == 1:
                    method = handle.options(stream=True).generate if requests[0].stream else handle.complete
                    call.response = method.remote(requests[0])
                else:
                    call.response = handle.options(stream=True).generate_many.remote(requests)
            except Exception as e:  # refused before it was sent: the batch's requests get the error
                for entry in batch:
                    entry.inbox.put_nowait(e)
                continue
            for entry in batch:
                entry.call = call
            metrics.REPLICA_CALLS.labels(self.model).inc()
            pump = asyncio.create_task(self._pump(call))
            self.pumps.add(pump)
            pump.add_done_callback(self.pumps.discard)
            await _routed(call.response)

    async def _pump(self, call: _Call) -> None:
        """Hands the call's chunks to their requests' inboxes (a gathered call's messages are lists of
        them, a lone stream's are chunks); at its end, what is still open gets None."""
        try:
            if isinstance(call.response, DeploymentResponseGenerator):
                async for message in call.response:
                    self._deliver(call, message if isinstance(message, list) else [message])
            else:
                self._deliver(call, [await call.response])
        except asyncio.CancelledError:
            raise
        except Exception as e:
            for rid in call.open:
                call.inboxes[rid].put_nowait(e)
            call.open.clear()
        for rid in call.open:  # the call ended before these did (its replica went away, or it was cancelled)
            call.inboxes[rid].put_nowait(None)
        call.open.clear()

    @staticmethod
    def _deliver(call: _Call, items: list[Chunk | Failed]) -> None:
        for item in items:
            inbox = call.inboxes.get(item.request_id)
            if inbox is None:  # stopped by its caller
                continue
            if isinstance(item, Failed):
                call.open.discard(item.request_id)
                inbox.put_nowait(item.error)
            else:
                if item.finished:
                    call.open.discard(item.request_id)
                inbox.put_nowait(item)


class ServeBackend:
    """A Ray Serve application per model, on a local Ray or the cluster at RAY_ADDRESS.

    `cluster_serve`: Serve belongs to the cluster's Serve config (KubeRay starts it with the
    RayService's proxy and HTTP options), so this process does not start it with its own."""

    name = "ray-serve"

    def __init__(
        self,
        store: ArtifactStore,
        limits: SamplingLimits,
        *,
        ray_num_cpus: int,
        dashboard: bool,
        dashboard_port: int,
        messages_per_second: float,
        cluster_serve: bool = False,
        preload: bool = True,
        gather: int = 1,
        engine_process: bool = True,
    ) -> None:
        """`preload`: replicas get runtime.preload_env (the config's cpu_preload); `gather`: requests a
        handle call carries at most (GatheredCalls; the config's gather_requests); `engine_process`:
        replicas run their engines in a child process (engine_process.py; the config's engine_process)."""
        self.store, self.limits, self.messages_per_second = store, limits, messages_per_second
        self.preload, self.gather, self.engine_process = preload, gather, engine_process
        self.ray_num_cpus, self.dashboard, self.dashboard_port = ray_num_cpus, dashboard, dashboard_port
        self.cluster_serve = cluster_serve
        self.dashboard_url = ""
        self.started_ray = False

    async def start(self) -> None:
        await asyncio.to_thread(self._connect)
        if not self.cluster_serve:
            await asyncio.to_thread(serve.start, proxy_location="Disabled")

    def _connect(self) -> None:
        if os.environ.get("RAY_ADDRESS"):
            ray.init(namespace=NAMESPACE)
            log.info("attached to the Ray cluster at %s", os.environ["RAY_ADDRESS"])
            return
        # a new Ray of our own, as secure as the stack's (token authentication with the token of
        # $LLMP_HOME/secrets, loopback only), never another process's that happens to run here
        context = start_local_ray(
            Path(llmp_home()),
            namespace=NAMESPACE,
            num_cpus=self.ray_num_cpus or None,
            include_dashboard=self.dashboard,
            dashboard_host="127.0.0.1",
            dashboard_port=self.dashboard_port,
        )
        self.started_ray = True
        self.dashboard_url = f"http://{context.dashboard_url}" if self.dashboard and context.dashboard_url else ""
        log.info("started a local Ray%s", f"; dashboard on {self.dashboard_url}" if self.dashboard_url else "")

    async def deploy(self, spec: ModelSpec) -> ServeModel:
        board = stats_board(spec.name)
        app = model_app(
            spec, str(self.store.root), self.limits, self.messages_per_second, self.preload, self.engine_process
        )
        try:
            handle = await asyncio.to_thread(serve.run, app, name=app_name(spec.name), route_prefix=None)
        except Exception:
            log.exception("model %s failed to deploy", spec.name)
            await self.remove(spec.name)
            raise Unavailable(f"model {spec.name!r} failed to deploy; see the service and Ray Serve logs") from None
        return ServeModel(spec.name, handle, board, self.gather)

    async def attach(self, spec: ModelSpec) -> ServeModel:
        """The application `app_name(spec.name)` that the cluster's Serve config deploys; its handle is
        taken on first use, so this process never waits for (nor deploys over) KubeRay's work."""
        return ServeModel(spec.name, None, stats_board(spec.name), self.gather)

    async def remove(self, name: str) -> None:
        await asyncio.to_thread(serve.delete, app_name(name))
        with contextlib.suppress(ValueError):  # no board: nothing to remove
            ray.kill(ray.get_actor(board_name(name), namespace=NAMESPACE))

    async def close(self) -> None:
        """Shut down what this process started (a local Ray); leave a cluster's applications running."""
        if self.started_ray:
            await asyncio.to_thread(serve.shutdown)
        ray.shutdown()
        if self.started_ray:
            remove_ray_temp_dir(Path(llmp_home()))
