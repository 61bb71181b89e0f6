"""The ASGI middleware every HTTP request passes first: request id, load shedding, body limit,
API key, deadline, and cancellation when the client hangs up.

- Request id: the caller's `X-Request-Id` (when plain: letters, digits, `._:-`, up to 64; else a
  new one) is set in the logging context, sent to every backend and returned in `X-Request-Id`.
- Load shedding: more than `max_in_flight` requests at once are refused at once with 429 and
  `Retry-After`, never queued.
- Body limit: a `Content-Length` over `max_body_bytes` is refused before reading; a chunked body
  is counted as it arrives and refused (413) when it passes the limit.
- API key: every path but /health and /metrics needs `Authorization: Bearer <key>` (or
  `X-Api-Key`); a missing, unknown, revoked or expired key is a 401 before any route runs. The
  key's record goes in `scope["state"]["key"]` for the route to check its scope and quota.
- Deadline: `X-Request-Timeout` (seconds) or the gateway's request timeout, whichever is sooner,
  becomes the deadline every backend call gets.
- Disconnect: the body is read by a pump that keeps listening afterwards; when the client goes
  away before the response is complete, the request's task is cancelled, which cancels the
  backend calls it is awaiting (streaming or not).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from libs.common.errors import InvalidArgument, LlmpError, ResourceExhausted
from libs.common.logs import request_id
from libs.common.rpc.interceptors import deadline
from services.gateway import metrics
from services.gateway.http_errors import error_response
from services.gateway.keys import KeyStore

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PUBLIC = ("/health", "/metrics")
# A caller's request id is passed on only when it is short and plain (it goes into gRPC metadata and logs).
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class PayloadTooLarge(InvalidArgument):
    http_status = 413


def header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return ""


def api_key(scope: Scope) -> str:
    auth = header(scope, b"authorization")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return header(scope, b"x-api-key").strip()


def request_timeout(scope: Scope, default: float) -> float:
    raw = header(scope, b"x-request-timeout")
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidArgument(f"{raw!r} is not a number of seconds", field="X-Request-Timeout") from None
    if not 0 < value < float("inf"):
        raise InvalidArgument("must be a positive number of seconds", field="X-Request-Timeout")
    return min(value, default)


class Guard:
    def __init__(
        self, app: Any, keys: KeyStore, *, max_in_flight: int, max_body_bytes: int, request_timeout: float
    ) -> None:
        self.app, self.keys = app, keys
        self.max_in_flight, self.max_body_bytes, self.timeout = max_in_flight, max_body_bytes, request_timeout
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = header(scope, b"x-request-id")
        rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex[:16]
        request_id.set(rid)
        status: list[int] = []
        send = _observed(send, rid, status)
        start = time.perf_counter()
        try:
            await self._serve(scope, receive, send)
        finally:
            route = getattr(scope.get("route"), "path", "-")  # the matched route's template
            metrics.LATENCY.labels(route).observe(time.perf_counter() - start)
            metrics.REQUESTS.labels(route, str(status[0]) if status else "none").inc()

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] in PUBLIC:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:
            metrics.SHED.inc()
            message = f"the gateway is serving {self.max_in_flight} requests; try again shortly"
            await error_response(ResourceExhausted(message, retry_after=1))(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self._guarded(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            length = header(scope, b"content-length")
            if length.isdigit() and int(length) > self.max_body_bytes:
                raise PayloadTooLarge(f"the body is over {self.max_body_bytes} bytes", field="body")
            scope.setdefault("state", {})["key"] = await self.keys.verify(api_key(scope))
            deadline.set(time.monotonic() + request_timeout(scope, self.timeout))
        except LlmpError as e:
            await error_response(e)(scope, receive, send)
            return
        await _Exchange(self.app, scope, receive, send, self.max_body_bytes).run()


def _observed(send: Send, rid: str, status: list[int]) -> Send:
    """`send` that adds the request id header and notes the status."""

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])
            headers = [(k, v) for k, v in message.get("headers", []) if k != b"x-request-id"]
            message["headers"] = [*headers, (b"x-request-id", rid.encode("latin-1"))]
        await send(message)

    return wrapped


class _Exchange:
    """One request: the app runs as a task fed by a pump that owns the client's receive channel."""

    def __init__(self, app: Any, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        self.app, self.scope, self.receive, self.send, self.limit = app, scope, receive, send, limit
        self.queue: asyncio.Queue[Message] = asyncio.Queue()
        self.started = self.done = False

    async def _send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.done = True
        await self.send(message)

    async def run(self) -> None:
        task = asyncio.create_task(self.app(self.scope, self.queue.get, self._send))
        pump = asyncio.create_task(self._pump(task))
        try:
            await task
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise  # the server is stopping us, not the client
            await pump  # the pump cut the request short: it answers 413, or the client is gone
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump

    async def _pump(self, task: asyncio.Task[None]) -> None:
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > self.limit:
                    task.cancel()
                    if not self.started:
                        error = PayloadTooLarge(f"the body is over {self.limit} bytes", field="body")
                        await error_response(error)(self.scope, self.queue.get, self.send)
                    return
            await self.queue.put(message)
            if message["type"] == "http.disconnect":
                if not self.done:
                    metrics.DISCONNECTS.inc()
                    task.cancel()
                return
