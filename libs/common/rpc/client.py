"""Client channels to llmp services, carrying the request id and the caller's remaining deadline."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from libs.common.logs import request_id
from libs.common.rpc.interceptors import REQUEST_ID_KEY, deadline
from libs.common.rpc.server import channel_options
from libs.common.settings import env


def address(service: str) -> str:
    """Where a service is reached: LLMP_<SERVICE>_ADDRESS, else 127.0.0.1:LLMP_<SERVICE>_PORT."""
    name = service.upper()
    return os.environ.get(f"LLMP_{name}_ADDRESS") or f"127.0.0.1:{env(f'LLMP_{name}_PORT')}"


def timeout(default: float | None) -> float | None:
    """The smaller of `default` and what is left of the current call's deadline."""
    end = deadline.get()
    if end is None:
        return default
    left = max(0.0, end - time.monotonic())
    return left if default is None else min(default, left)


def _metadata(metadata: Any) -> list[tuple[str, str]]:
    out = list(metadata or ())
    rid = request_id.get()
    if rid and not any(k == REQUEST_ID_KEY for k, _ in out):
        out.append((REQUEST_ID_KEY, rid))
    key = os.environ.get("LLMP_API_KEY")  # a gateway in front (`llmp --gateway`) wants the caller's key
    if key and not any(k == "authorization" for k, _ in out):
        out.append(("authorization", f"Bearer {key}"))
    return out


class _Propagate(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds x-request-id and narrows the timeout to the current deadline on every outgoing call."""

    def _details(self, details: Any) -> Any:
        return _Details(
            details.method,
            timeout(details.timeout),
            _metadata(details.metadata),
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


class _Details(grpc.ClientCallDetails):
    def __init__(
        self, method: str, timeout: float | None, metadata: Any, credentials: Any, wait_for_ready: Any, compression: Any
    ) -> None:
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


def channel(target: str, *, max_message_bytes: int = 64 << 20) -> grpc.Channel:
    """A blocking channel (command line, tests, threads)."""
    return grpc.intercept_channel(
        grpc.insecure_channel(target, options=channel_options(max_message_bytes)), _Propagate()
    )


def health_status(target: str, service: str = "", timeout_s: float = 2.0) -> str:
    """'SERVING', 'NOT_SERVING', or 'UNREACHABLE'."""
    with grpc.insecure_channel(target) as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError:
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def wait_serving(target: str, timeout_s: float = 60.0, is_alive: Callable[[], bool] = lambda: True) -> bool:
    """Poll the health service until SERVING; False on timeout or when `is_alive` says the server died."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if health_status(target, timeout_s=1.0) == "SERVING":
            return True
        if not is_alive():
            return False
        time.sleep(0.1)
    return False
