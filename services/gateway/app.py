"""The HTTP application: FastAPI routes behind the Guard middleware, and what they share.

    gateway = Gateway(config, keys, quotas, backends, texts)
    app = create_app(gateway)          # served by uvicorn (see __main__)

Routes take the caller's key from the Guard (which has already checked it) and name the scope
they need with `require(scope)`, which also admits the call against the key's quota.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import JSONResponse, Response

from libs.common.errors import PermissionDenied
from services.gateway import http_errors, metrics
from services.gateway.backends import Backends
from services.gateway.config import GatewayConfig
from services.gateway.guard import Guard
from services.gateway.keys import KeyRecord, KeyStore
from services.gateway.model_text import ModelTexts
from services.gateway.quota import Quotas

VERSION = "0.1.0"


@dataclass
class Gateway:
    """Everything the routes and RPCs use."""

    config: GatewayConfig
    keys: KeyStore
    quotas: Quotas
    backends: Backends
    texts: ModelTexts
    serving: bool = False


def gateway(request: Request) -> Gateway:
    return request.app.state.gateway  # type: ignore[no-any-return]


_bearer = HTTPBearer(auto_error=False, description="an llmp API key: `Authorization: Bearer llmp_...`")


def require(scope: str) -> Any:
    """A dependency: the caller's key, which must hold `scope` and be within its quota."""

    async def check(request: Request, _: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> KeyRecord:
        key: KeyRecord = request.scope["state"]["key"]  # the Guard verified it
        if scope and not key.allows(scope):
            raise PermissionDenied(f"API key {key.id} lacks the {scope!r} scope (it has {','.join(key.scopes)})")
        try:
            await gateway(request).quotas.admit(key)
        except Exception:
            metrics.QUOTA_REFUSED.inc()
            raise
        return key

    return Depends(check)


def routes() -> FastAPI:
    """The FastAPI app: every route and the OpenAPI document (no state: create_app adds it)."""
    from services.gateway import openai_api, platform_api

    app = FastAPI(
        title="llmp gateway",
        version=VERSION,
        description="OpenAI-compatible inference (/v1), the platform API (/api/v1), tokenize/detokenize. "
        "Every route but /health and /metrics needs an API key (Authorization: Bearer).",
    )
    http_errors.install(app)

    @app.get("/health", tags=["ops"], summary="liveness and readiness (no key)")
    async def health(request: Request) -> JSONResponse:
        ok = gateway(request).serving
        return JSONResponse({"status": "SERVING" if ok else "NOT_SERVING"}, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics (no key)")
    async def prometheus() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    app.include_router(openai_api.router)
    app.include_router(platform_api.router)
    return app


def create_app(gw: Gateway) -> Guard:
    """The app with its state, wrapped in the Guard: what uvicorn serves."""
    app = routes()
    app.state.gateway = gw
    config = gw.config
    return Guard(
        app,
        gw.keys,
        max_in_flight=config.max_in_flight,
        max_body_bytes=config.max_body_bytes,
        request_timeout=config.request_timeout,
    )


def now() -> int:
    return int(time.time())
