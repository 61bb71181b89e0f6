"""Slow calls over real gRPC: many blocking watches leave health and cheap calls responsive.

The watches block worker threads (as a Redis XREAD does) in numbers beyond the event loop's
default pool; cheap calls and health still answer, one watch past `max_slow_calls` is refused
at once, and every watch ends with its own answer once released.
"""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from libs.common.config import ServiceConfig
from libs.common.rpc.pools import run_blocking
from libs.common.rpc.server import Registration, Server

pytestmark = pytest.mark.integration

SLOW_LIMIT = 12  # above the default pool of min(32, cores + 4) threads on a small machine


class Watcher:
    """`watch` blocks a worker thread until released; `describe` is a cheap blocking call."""

    SLOW_METHODS = frozenset({"watch"})

    def __init__(self) -> None:
        self.release = threading.Event()
        self.blocked = 0
        self._count = threading.Lock()
        self.all_blocked = threading.Event()

    def _wait(self, request: bytes) -> bytes:
        with self._count:
            self.blocked += 1
            if self.blocked == SLOW_LIMIT:
                self.all_blocked.set()
        self.release.wait()
        return request + b":" + threading.current_thread().name.encode()

    async def watch(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await run_blocking(self._wait, request)

    async def describe(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await run_blocking(lambda: threading.current_thread().name.encode())

    def add(self, server: grpc.aio.Server) -> None:
        handlers = {n: grpc.unary_unary_rpc_method_handler(getattr(self, n)) for n in ("watch", "describe")}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Watcher", handlers),))


def test_blocked_slow_calls_leave_health_and_cheap_calls_responsive() -> None:
    async def body() -> None:
        watcher = Watcher()
        config = ServiceConfig(port=0, metrics_port=-1, max_slow_calls=SLOW_LIMIT)
        server = Server("watcher", config, [Registration(lambda w, s: w.add(s), watcher, "test.Watcher")])
        port = await server.start()
        await server.set_serving(True)
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        watch, describe = ch.unary_unary("/test.Watcher/watch"), ch.unary_unary("/test.Watcher/describe")
        try:
            watches = [asyncio.ensure_future(watch(str(i).encode())) for i in range(SLOW_LIMIT)]
            assert await asyncio.to_thread(watcher.all_blocked.wait, 60), "every watch holds a thread"

            health = health_pb2_grpc.HealthStub(ch)
            status = (await health.Check(health_pb2.HealthCheckRequest(), timeout=20)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            cheap = [await describe(b"", timeout=20) for _ in range(3)]
            assert all(not name.startswith(b"llmp-slow") for name in cheap), cheap
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await watch(b"one too many")
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

            watcher.release.set()
            answers = await asyncio.gather(*watches)
            for i, answer in enumerate(answers):
                number, thread = answer.split(b":", 1)
                assert number == str(i).encode() and thread.startswith(b"llmp-slow")
            assert (await watch(b"again")).startswith(b"again:"), "released slots are free again"
        finally:
            watcher.release.set()
            await ch.close()
            await server.stop()

    asyncio.run(body())
