"""Domain errors and the status codes they map to (gRPC and HTTP), as design.md fixes them.

Core code raises these; the server kit's interceptor turns them into gRPC statuses and the
gateway into HTTP responses. Anything else that escapes is an internal error: logged with the
request id, never shown to the caller.
"""

from __future__ import annotations

import grpc


class LlmpError(Exception):
    grpc_code = grpc.StatusCode.INTERNAL
    http_status = 500

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        self.message = f"{field}: {message}" if field else message
        super().__init__(self.message)


class InvalidArgument(LlmpError):
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400


class NotFound(LlmpError):
    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404


class AlreadyExists(LlmpError):
    grpc_code = grpc.StatusCode.ALREADY_EXISTS
    http_status = 409


class FailedPrecondition(LlmpError):
    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 409


class ResourceExhausted(LlmpError):
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429

    def __init__(self, message: str, *, retry_after: float = 1.0, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.retry_after = retry_after


class Unauthenticated(LlmpError):
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401


class PermissionDenied(LlmpError):
    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    http_status = 403


class Unavailable(LlmpError):
    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


class DeadlineExceeded(LlmpError):
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504


class Cancelled(LlmpError):
    grpc_code = grpc.StatusCode.CANCELLED
    http_status = 499


HTTP_STATUS_OF_GRPC: dict[grpc.StatusCode, int] = {
    cls.grpc_code: cls.http_status
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        ResourceExhausted,
        Unauthenticated,
        PermissionDenied,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
    )
} | {grpc.StatusCode.FAILED_PRECONDITION: 409, grpc.StatusCode.OK: 200}
