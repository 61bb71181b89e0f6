"""The services behind the gateway: one grpc.aio channel each, and their errors as domain errors.

Every call carries the request id (x-request-id) and the time left of the request's deadline
(the contextvars the HTTP middleware and the gRPC kit set), so a backend stops when the caller's
time is up. A backend that is down fails fast with UNAVAILABLE (no wait-for-ready), which
becomes 503 for that route only.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
from llmp.inference.v1 import inference_pb2_grpc
from llmp.retrieval.v1 import retrieval_pb2_grpc
from llmp.tokenizer.v1 import tokenizer_pb2_grpc
from llmp.training.v1 import training_pb2_grpc

from libs.common import errors
from libs.common.logs import request_id
from libs.common.rpc.client import address, timeout
from libs.common.rpc.interceptors import REQUEST_ID_KEY
from libs.common.rpc.server import channel_options

SERVICES = ("tokenizer", "retrieval", "training", "inference")
_FIELD = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")


class BackendError(errors.LlmpError):
    """A backend failed in a way the caller cannot fix (its INTERNAL or UNKNOWN)."""

    http_status = 502


_ERRORS: dict[grpc.StatusCode, type[errors.LlmpError]] = {
    cls.grpc_code: cls
    for cls in (
        errors.InvalidArgument,
        errors.NotFound,
        errors.AlreadyExists,
        errors.FailedPrecondition,
        errors.ResourceExhausted,
        errors.Unauthenticated,
        errors.PermissionDenied,
        errors.Unavailable,
        errors.DeadlineExceeded,
        errors.Cancelled,
    )
}


def domain_error(service: str, e: grpc.RpcError) -> errors.LlmpError:
    """The backend's status as the domain error the gateway answers with (field kept when named)."""
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = (e.details() if hasattr(e, "details") else "") or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return errors.Unavailable(f"the {service} service is unavailable")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return errors.DeadlineExceeded(f"the request's deadline passed in the {service} service")
    cls = _ERRORS.get(code)
    if cls is None:
        return BackendError(f"the {service} service failed (request id {request_id.get()})")
    match = _FIELD.match(details)
    error = cls(details[match.end() :], field=match.group(1)) if match else cls(details)
    if isinstance(error, errors.ResourceExhausted):
        error.retry_after = 1.0
    return error


@contextlib.contextmanager
def translated(service: str) -> Iterator[None]:
    try:
        yield
    except grpc.RpcError as e:
        raise domain_error(service, e) from None


def call_options() -> dict[str, Any]:
    """Deadline and request id of the request in progress, for one backend call."""
    rid = request_id.get()
    return {"timeout": timeout(None), "metadata": ((REQUEST_ID_KEY, rid),) if rid else ()}


class Backends:
    """Stubs of the four services over grpc.aio channels made once (addresses: LLMP_<NAME>_ADDRESS)."""

    def __init__(self, addresses: dict[str, str] | None = None, max_message_bytes: int = 64 << 20) -> None:
        addresses = addresses or {}
        self.addresses = {name: addresses.get(name) or address(name) for name in SERVICES}
        self.channels = {
            name: grpc.aio.insecure_channel(target, options=channel_options(max_message_bytes))
            for name, target in self.addresses.items()
        }
        self.tokenizer = tokenizer_pb2_grpc.TokenizerServiceStub(self.channels["tokenizer"])
        self.retrieval = retrieval_pb2_grpc.RetrievalServiceStub(self.channels["retrieval"])
        self.training = training_pb2_grpc.TrainingServiceStub(self.channels["training"])
        self.inference = inference_pb2_grpc.InferenceServiceStub(self.channels["inference"])

    async def close(self) -> None:
        for ch in self.channels.values():
            await ch.close()


async def unary(service: str, method: Any, request: Any) -> Any:
    """One unary backend call with the request's deadline and id; its failure as a domain error."""
    with translated(service):
        return await method(request, **call_options())


async def stream(service: str, method: Any, request: Any) -> AsyncIterator[Any]:
    """A server-streaming backend call; leaving the loop early (or being cancelled) cancels it."""
    call = method(request, **call_options())
    try:
        with translated(service):
            async for message in call:
                yield message
    finally:
        call.cancel()
