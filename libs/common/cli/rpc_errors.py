"""Turn gRPC errors into one clear line on the command line."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc

from libs.common.errors import LlmpError


class RemoteError(LlmpError):
    pass


@contextlib.contextmanager
def remote(what: str) -> Iterator[None]:
    try:
        yield
    except grpc.RpcError as e:
        code = e.code() if hasattr(e, "code") else None
        details = e.details() if hasattr(e, "details") else str(e)
        if code == grpc.StatusCode.UNAVAILABLE:
            raise RemoteError(f"{what} is not reachable ({details}); is the stack up? (llmp up)") from None
        raise RemoteError(f"{what}: {code.name if code else 'error'}: {details}") from None
