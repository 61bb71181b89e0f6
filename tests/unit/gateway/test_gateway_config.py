"""The gateway's settings: every field has its declared LLMP_GATEWAY_* variable with the same default."""

from __future__ import annotations

import dataclasses

from libs.common import config as cfg
from libs.common.settings import VARIABLES
from services.gateway.config import GatewayConfig


def test_every_setting_is_declared_with_its_default() -> None:
    assert cfg.undeclared(GatewayConfig, "gateway") == []
    defaults = GatewayConfig()
    for field in dataclasses.fields(GatewayConfig):
        declared = VARIABLES[cfg.env_name("gateway", field.name)].default
        value = getattr(defaults, field.name)
        assert cfg._coerce(declared, type(value), field.name) == value, field.name


def test_environment_overrides() -> None:
    loaded = cfg.load(
        GatewayConfig, "gateway", environ={"LLMP_GATEWAY_HTTP_PORT": "9000", "LLMP_GATEWAY_REQUEST_TIMEOUT": "5"}
    )
    assert (loaded.http_port, loaded.request_timeout, loaded.host) == (9000, 5.0, "127.0.0.1")
