"""The one server interceptor: request ids, deadlines, metrics, and domain errors -> status codes.

Every call gets a request id (the caller's `x-request-id`, or a new one), sent back in the
initial metadata and set in the logging context. LlmpError becomes its status code with its
message; any other exception becomes INTERNAL with only the request id, and is logged with its
stack trace. A request that cannot be decoded (e.g. a string field with invalid UTF-8) is an
INVALID_ARGUMENT instead of the library's opaque error. A call of a slow method is admitted by
the server's `SlowCalls` (refused when too many are in flight) and runs its blocking work in
their pool (see pools.py).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from libs.common.errors import InvalidArgument, LlmpError
from libs.common.logs import request_id
from libs.common.rpc.metrics import IN_FLIGHT, LATENCY, REQUESTS
from libs.common.rpc.pools import SlowCalls

log = logging.getLogger(__name__)

#: Absolute time.monotonic() by which the current call must finish (None: no deadline).
deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("llmp_deadline", default=None)

REQUEST_ID_KEY = "x-request-id"
#: Longest status message sent: messages quote the caller's values, and gRPC refuses trailing
#: metadata past its size limit (8 KiB by default), which would turn a refusal into an opaque error.
MAX_DETAILS_CHARS = 1024


def details(message: str) -> str:
    """`message`, cut to MAX_DETAILS_CHARS with a note when longer."""
    if len(message) <= MAX_DETAILS_CHARS:
        return message
    return message[: MAX_DETAILS_CHARS - 40] + f"... ({len(message)} characters in all)"


class _Undecodable:
    """Stands in for a request whose bytes did not parse, so the handler can refuse it clearly."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _safe_deserializer(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except (DecodeError, UnicodeDecodeError, ValueError) as e:
            return _Undecodable(e)

    return parse


def _check(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise InvalidArgument(
            f"request could not be decoded ({request.error}); text fields must be valid UTF-8", field="request"
        )
    return request


class ServerInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self, service: str, slow_methods: frozenset[str] = frozenset(), slow_calls: SlowCalls | None = None
    ) -> None:
        self.service = service
        #: Full method paths ("/pkg.Service/Method") admitted and run by `slow_calls`.
        self.slow_methods = slow_methods
        self.slow_calls = slow_calls

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(("/grpc.health.", "/grpc.reflection.")):
            return handler
        method = details.method.rsplit("/", 1)[-1]
        metadata = dict(details.invocation_metadata or ())
        rid = str(metadata.get(REQUEST_ID_KEY) or uuid.uuid4().hex[:16])

        slow = self.slow_calls if details.method in self.slow_methods else None
        call = _Call(self.service, method, rid, slow)
        kinds = {
            "unary_unary": (handler.unary_unary, call.unary, grpc.unary_unary_rpc_method_handler),
            "unary_stream": (handler.unary_stream, call.server_stream, grpc.unary_stream_rpc_method_handler),
            "stream_unary": (handler.stream_unary, call.client_stream, grpc.stream_unary_rpc_method_handler),
            "stream_stream": (handler.stream_stream, call.bidi_stream, grpc.stream_stream_rpc_method_handler),
        }
        for behavior, wrap, make in kinds.values():
            if behavior is not None:
                return make(
                    wrap(behavior),
                    request_deserializer=_safe_deserializer(handler.request_deserializer),
                    response_serializer=handler.response_serializer,
                )
        return handler


class _Call:
    """Wraps one call's behaviour with the request context, metrics and error mapping."""

    def __init__(self, service: str, method: str, rid: str, slow: SlowCalls | None = None) -> None:
        self.service, self.method, self.rid = service, method, rid
        self.slow = slow
        self._ended = self._admitted = False

    def _admit(self) -> None:
        """A slow method's call takes one of the slow slots (ResourceExhausted when none is free)."""
        if self.slow is not None:
            self.slow.admit(self.method)
            self._admitted = True

    async def _enter(self, context: grpc.aio.ServicerContext) -> float:
        request_id.set(self.rid)
        remaining = context.time_remaining()
        deadline.set(time.monotonic() + remaining if remaining is not None else None)
        await context.send_initial_metadata(((REQUEST_ID_KEY, self.rid),))
        IN_FLIGHT.labels(self.service, self.method).inc()
        return time.perf_counter()

    def _exit(self, start: float, code: str) -> None:
        """Record the call's end once: on a failure before its status goes out, else on return."""
        if self._ended:
            return
        self._ended = True
        if self._admitted and self.slow is not None:
            self.slow.release()
        IN_FLIGHT.labels(self.service, self.method).dec()
        LATENCY.labels(self.service, self.method).observe(time.perf_counter() - start)
        REQUESTS.labels(self.service, self.method, code).inc()

    async def _fail(self, context: grpc.aio.ServicerContext, start: float, error: BaseException) -> None:
        """Abort the call with the right status, recorded first: a caller holding the status sees it counted."""
        if isinstance(error, LlmpError):
            self._exit(start, error.grpc_code.name)
            log.info("%s refused: %s", self.method, error.message, extra={"code": error.grpc_code.name})
            await context.abort(error.grpc_code, details(error.message))
        self._exit(start, "INTERNAL")
        log.error("%s failed", self.method, exc_info=error)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {self.rid})")

    def unary(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = await self._enter(context)
            code = "OK"
            try:
                self._admit()
                return await behavior(_check(request), context)
            except grpc.aio.AbortError:
                code = _code_name(context)
                raise
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception as e:
                await self._fail(context, start, e)
            finally:
                self._exit(start, code)

        return run

    def client_stream(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        unary = self.unary(behavior)

        async def run(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            return await unary(_checked(requests), context)

        return run

    def server_stream(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            start = await self._enter(context)
            code = "OK"
            try:
                self._admit()
                async for item in behavior(_check(request), context):
                    yield item
            except grpc.aio.AbortError:
                code = _code_name(context)
                raise
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception as e:
                await self._fail(context, start, e)
            finally:
                self._exit(start, code)

        return run

    def bidi_stream(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        stream = self.server_stream(behavior)

        async def run(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for item in stream(_checked(requests), context):
                yield item

        return run


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _check(request)


def _code_name(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
