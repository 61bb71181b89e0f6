"""The gRPC server kit over real sockets: errors, request ids, deadlines, limits, health, drain, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from libs.common.config import ServiceConfig
from libs.common.errors import InvalidArgument
from libs.common.rpc import client
from libs.common.rpc.interceptors import MAX_DETAILS_CHARS, deadline
from libs.common.rpc.metrics import REQUESTS, SERVING
from libs.common.rpc.server import Registration, Server

pytestmark = pytest.mark.integration


class Kit:
    """A raw-bytes service with one method per behaviour under test."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def echo(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    async def invalid(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise InvalidArgument("must be positive", field="vocab_size")

    async def wordy(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise InvalidArgument(f"no tokenizer {'x' * 100_000!r}", field="tokenizer")

    async def crash(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise RuntimeError("secret internals")

    async def slow(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.entered.set()
        await self.release.wait()
        return b"done"

    async def budget(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        remaining = client.timeout(60.0)
        assert deadline.get() is not None
        return f"{remaining:.3f}".encode()

    def registration(self) -> Registration:
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(getattr(self, name))
            for name in ("echo", "invalid", "wordy", "crash", "slow", "budget")
        }
        handler = grpc.method_handlers_generic_handler("test.Kit", handlers)
        return Registration(lambda h, server: server.add_generic_rpc_handlers((h,)), handler, "test.Kit")


@contextlib.asynccontextmanager
async def started(kit: Kit, **overrides: int) -> AsyncIterator[tuple[Server, grpc.aio.Channel]]:
    """A started server and a channel to it, both closed however the test ends."""
    config = ServiceConfig(port=0, metrics_port=-1, **overrides)
    server = Server("kit", config, [kit.registration()])
    port = await server.start()
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield server, ch
    finally:
        await ch.close()
        await server.stop()


def call(ch: grpc.aio.Channel, method: str):
    return ch.unary_unary(f"/test.Kit/{method}")


def run(coro) -> None:
    asyncio.run(coro)


def test_errors_become_status_codes_without_internals() -> None:
    async def body() -> None:
        kit = Kit()
        async with started(kit) as (_server, ch):
            before = REQUESTS.labels("kit", "crash", "INTERNAL")._value.get()
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await call(ch, "invalid")(b"")
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert bad.value.details() == "vocab_size: must be positive"
            with pytest.raises(grpc.aio.AioRpcError) as crash:
                await call(ch, "crash")(b"", metadata=(("x-request-id", "req-42"),))
            assert crash.value.code() == grpc.StatusCode.INTERNAL
            assert crash.value.details() == "internal error (request id req-42)"
            assert REQUESTS.labels("kit", "crash", "INTERNAL")._value.get() == before + 1

    run(body())


def test_long_messages_are_cut_so_the_status_still_arrives() -> None:
    """A refusal quoting a 100 kB value would exceed gRPC's metadata limit and reach the caller as an
    opaque error; cut, it stays INVALID_ARGUMENT naming the field."""

    async def body() -> None:
        async with started(Kit()) as (_server, ch):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call(ch, "wordy")(b"")
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert e.value.details().startswith("tokenizer: no tokenizer 'xxx")
            assert len(e.value.details()) <= MAX_DETAILS_CHARS

    run(body())


def test_request_id_is_echoed_or_created() -> None:
    async def body() -> None:
        async with started(Kit()) as (_server, ch):
            reply = call(ch, "echo")(b"hi", metadata=(("x-request-id", "abc"),))
            assert await reply == b"hi"
            assert ("x-request-id", "abc") in tuple(await reply.initial_metadata())
            fresh = call(ch, "echo")(b"")
            await fresh
            assert dict(await fresh.initial_metadata())["x-request-id"]

    run(body())


def test_deadline_travels_into_the_handler() -> None:
    async def body() -> None:
        async with started(Kit()) as (_server, ch):
            remaining = float(await call(ch, "budget")(b"", timeout=5))
            assert 0 < remaining <= 5.5, remaining  # the call's 5 s (gRPC may round it up a little), not 60 s

    run(body())


def test_concurrency_cap_refuses_instead_of_queueing() -> None:
    async def body() -> None:
        kit = Kit()
        async with started(kit, max_concurrent_rpcs=1) as (_server, ch):
            first = asyncio.ensure_future(call(ch, "slow")(b""))
            await kit.entered.wait()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(ch, "echo")(b"x")
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            kit.release.set()
            assert await first == b"done"

    run(body())


def test_message_size_limit() -> None:
    async def body() -> None:
        async with started(Kit(), max_message_bytes=1024) as (_server, ch):
            assert await call(ch, "echo")(b"x" * 512) == b"x" * 512
            with pytest.raises(grpc.aio.AioRpcError) as big:
                await call(ch, "echo")(b"x" * 4096)
            assert big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    run(body())


def test_health_and_drain_with_a_call_in_flight() -> None:
    async def body() -> None:
        kit = Kit()
        async with started(kit) as (server, ch):
            health = health_pb2_grpc.HealthStub(ch)
            check = health_pb2.HealthCheckRequest(service="test.Kit")
            assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.NOT_SERVING
            await server.set_serving(True)
            assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.SERVING

            in_flight = asyncio.ensure_future(call(ch, "slow")(b""))
            await kit.entered.wait()
            seen_during_drain: list[float] = []

            async def drain() -> None:
                seen_during_drain.append(SERVING.labels("kit")._value.get())
                kit.release.set()

            await server.stop(drain)
            assert await in_flight == b"done", "an in-flight call finishes during the drain"
            assert seen_during_drain == [0.0], "health is NOT_SERVING while draining"
            with pytest.raises(grpc.aio.AioRpcError) as after:
                await call(ch, "echo")(b"", timeout=2)
            assert after.value.code() == grpc.StatusCode.UNAVAILABLE

    run(body())


async def _reflected(ch: grpc.aio.Channel) -> AsyncIterator[str]:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(ch)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async for reply in stub.ServerReflectionInfo(iter([request])):
        for service in reply.list_services_response.service:
            yield service.name


def test_reflection_lists_the_services() -> None:
    async def body() -> None:
        async with started(Kit()) as (_server, ch):
            names = [n async for n in _reflected(ch)]
            assert {"test.Kit", "grpc.health.v1.Health"} <= set(names)

    run(body())


def test_a_taken_port_names_the_variable_to_change() -> None:
    """Neither the gRPC port nor the metrics port is shared (no SO_REUSEPORT): a second server is refused."""
    from libs.common.ports import PortInUse

    async def scenario() -> None:
        async with started(Kit()) as (first, _):
            second = Server("kit", ServiceConfig(port=first.port, metrics_port=-1), [Kit().registration()])
            with pytest.raises(PortInUse, match=f"^port {first.port} is in use: set LLMP_KIT_PORT$"):
                await second.start()
            with socket.socket() as taken:
                taken.bind(("127.0.0.1", 0))
                taken.listen()
                metrics = taken.getsockname()[1]
                third = Server("kit", ServiceConfig(port=0, metrics_port=metrics), [Kit().registration()])
                with pytest.raises(PortInUse, match=f"^port {metrics} is in use: set LLMP_KIT_METRICS_PORT$"):
                    await third.start()

    run(scenario())
