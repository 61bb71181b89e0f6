"""OpenAI's error envelope for every HTTP error the gateway returns.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}

Domain errors keep their status (design.md's table) and name the field in `param`; a request
body that fails validation is a 400 naming the first bad field; anything unexpected is a 500
that shows only the request id (the stack trace goes to the log).
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from libs.common.errors import LlmpError, ResourceExhausted
from libs.common.logs import request_id

log = logging.getLogger(__name__)
_NAMED = re.compile(r"^Value error, ([A-Za-z_][\w.\[\]]*): (.*)$", re.S)

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "cancelled",
    502: "server_error",
    503: "service_unavailable",
    504: "timeout",
}
CODES = {401: "invalid_api_key", 403: "insufficient_scope", 413: "request_too_large", 429: "rate_limit_exceeded"}


def envelope(status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None) -> Response:
    body = {
        "error": {
            "message": message,
            "type": TYPES.get(status, "server_error"),
            "param": param,
            "code": CODES.get(status),
        }
    }
    out = dict(headers or {})
    rid = request_id.get()
    if rid:
        out["x-request-id"] = rid
    return Response(json.dumps(body), status_code=status, media_type="application/json", headers=out)


def error_response(error: Exception) -> Response:
    if isinstance(error, LlmpError):
        headers = {}
        if isinstance(error, ResourceExhausted):
            headers["retry-after"] = str(max(1, math.ceil(error.retry_after)))
        message = error.message
        if error.field and message.startswith(f"{error.field}: "):
            message = message[len(error.field) + 2 :]
        return envelope(error.http_status, message, error.field, headers)
    log.error("request failed", exc_info=error)
    return envelope(500, f"internal error (request id {request_id.get()})")


def _loc(loc: tuple[Any, ...]) -> str:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'."""
    out = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not str(part).startswith(("function-", "literal[", "constrained-", "list[", "union[", "str", "int")):
            out += f".{part}" if out else str(part)
    return out or "body"


def validation_response(error: RequestValidationError) -> Response:
    first = error.errors()[0] if error.errors() else {"loc": ("body",), "msg": "invalid request"}
    param = _loc(tuple(first.get("loc", ())))
    if first.get("type") == "json_invalid":
        return envelope(400, "the body is not valid JSON", "body")
    message = str(first.get("msg", "invalid"))
    named = _NAMED.match(message)  # a model validator's "Value error, <field>: <why>"
    if named:
        return envelope(400, named.group(2), named.group(1))
    return envelope(400, message, param)


def install(app: FastAPI) -> None:
    async def on_llmp(request: Request, error: Exception) -> Response:
        return error_response(error)

    async def on_validation(request: Request, error: Exception) -> Response:
        assert isinstance(error, RequestValidationError)
        return validation_response(error)

    async def on_http(request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        return envelope(error.status_code, str(error.detail), headers=dict(error.headers or {}))

    async def on_unicode(request: Request, error: Exception) -> Response:
        # JSON can carry lone surrogates ("\ud800"); no protobuf string or tokenizer takes them
        return envelope(400, "text must be valid Unicode (a lone surrogate is not)", "body")

    app.add_exception_handler(UnicodeEncodeError, on_unicode)
    app.add_exception_handler(LlmpError, on_llmp)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http)
    app.add_exception_handler(Exception, on_llmp)
