"""The gateway's settings: read from LLMP_GATEWAY_* variables."""

from __future__ import annotations

from libs.common import config as cfg
from services.gateway.config import GatewayConfig


def test_environment_overrides() -> None:
    loaded = cfg.load(
        GatewayConfig, "gateway", environ={"LLMP_GATEWAY_HTTP_PORT": "9000", "LLMP_GATEWAY_REQUEST_TIMEOUT": "5"}
    )
    assert (loaded.http_port, loaded.request_timeout, loaded.host) == (9000, 5.0, "127.0.0.1")
