"""Build, run and drain a gRPC server: health, reflection, limits, interceptor, metrics, SIGTERM.

    server = Server("tokenizer", config, [Registration(add_fn, servicer, full_name)])
    asyncio.run(server.run(load=core.load, drain=core.drain))

Health is NOT_SERVING while `load` runs and again while draining; SIGTERM/SIGINT stop new calls,
let in-flight ones finish within `drain_seconds`, run `drain`, then stop. A servicer's
`SLOW_METHODS` (method names) are admitted and run apart from the other calls (pools.py), at most
`max_slow_calls` at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from libs.common.config import ServiceConfig, env_name
from libs.common.ports import PortInUse, ensure_free
from libs.common.rpc.interceptors import ServerInterceptor
from libs.common.rpc.metrics import SERVING, serve_metrics
from libs.common.rpc.pools import SlowCalls
from libs.common.service import freeze_heap

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Registration:
    """One servicer: the generated add_*_to_server function, the servicer, and its full name."""

    add: Callable[[Any, grpc.aio.Server], None]
    servicer: Any
    full_name: str

    def slow_methods(self) -> set[str]:
        """Full paths of the servicer's slow methods (its SLOW_METHODS attribute, if any)."""
        return {f"/{self.full_name}/{m}" for m in getattr(self.servicer, "SLOW_METHODS", ())}


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


class Server:
    def __init__(self, service: str, config: ServiceConfig, registrations: Sequence[Registration]) -> None:
        self.service = service
        self.config = config
        self.registrations = list(registrations)
        self.health = health.aio.HealthServicer()
        self.port: int = 0
        self._server: grpc.aio.Server | None = None
        self._stopping: asyncio.Event | None = None
        self.slow_calls = SlowCalls(config.max_slow_calls)

    async def start(self) -> int:
        """Bind and start (NOT_SERVING); returns the bound port."""
        slow = frozenset(m for r in self.registrations for m in r.slow_methods())
        # a taken port is one clear line naming the variable to change, before gRPC logs its own error
        ensure_free(self.config.host, self.config.port, env_name(self.service, "port"))
        ensure_free(self.config.host, self.config.metrics_port, env_name(self.service, "metrics_port"))
        server = grpc.aio.server(
            interceptors=[ServerInterceptor(self.service, slow, self.slow_calls)],
            # no SO_REUSEPORT: a second server on a taken port must fail, not share it silently
            options=[*channel_options(self.config.max_message_bytes), ("grpc.so_reuseport", 0)],
            maximum_concurrent_rpcs=self.config.max_concurrent_rpcs,
        )
        for reg in self.registrations:
            reg.add(reg.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [r.full_name for r in self.registrations]
        reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        self.port = server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        if self.port == 0:
            raise OSError(f"cannot bind {self.config.host}:{self.config.port}")
        await self.set_serving(False)
        await server.start()
        self._server = server
        serve_metrics(self.config.host, self.config.metrics_port, env_name(self.service, "metrics_port"))
        log.info("%s listening on %s:%d", self.service, self.config.host, self.port)
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *(r.full_name for r in self.registrations)]:
            await self.health.set(name, status)
        SERVING.labels(self.service).set(1 if serving else 0)

    async def stop(self, drain: Callable[[], Awaitable[None]] | None = None) -> None:
        """Refuse new calls, let in-flight calls finish within the grace period, then stop."""
        if self._server is None:
            return
        log.info("%s draining (grace %.0fs)", self.service, self.config.drain_seconds)
        await self.set_serving(False)
        stopped = asyncio.ensure_future(self._server.stop(self.config.drain_seconds))
        if drain is not None:
            await drain()
        await stopped
        self._server = None
        self.slow_calls.close()
        log.info("%s stopped", self.service)

    def _handle_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)  # type: ignore[union-attr]

    async def run(
        self,
        load: Callable[[], Awaitable[None]] | None = None,
        drain: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Start, load, serve until SIGTERM/SIGINT, drain."""
        self._stopping = asyncio.Event()
        self._handle_signals()
        try:
            await self.start()
        except PortInUse as e:  # one line for the user (and the stack's log), not a traceback
            raise SystemExit(e.message) from None
        if load is not None:
            await load()
            self._handle_signals()  # loading may have installed its own handlers (ray.init does)
        freeze_heap()
        await self.set_serving(True)
        log.info("%s serving", self.service)
        await self._stopping.wait()
        await self.stop(drain)
