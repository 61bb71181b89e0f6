"""Settings of the gateway (section `gateway` of the config file, LLMP_GATEWAY_*)."""

from __future__ import annotations

from dataclasses import dataclass

from libs.common.config import ServiceConfig, doc


@dataclass
class GatewayConfig(ServiceConfig):
    port: int = doc("gRPC port", 50050)
    metrics_port: int = doc("Prometheus port (-1: off); the same metrics are on HTTP /metrics", 51050)
    http_port: int = doc("HTTP port: OpenAI-compatible /v1, platform /api/v1, /health, /metrics", 8000)
    admin_key: str = doc("an admin API key registered at start (e.g. from a Kubernetes Secret)", "")
    max_body_bytes: int = doc("largest HTTP request body read; larger ones get 413", 8 << 20)
    max_in_flight: int = doc("requests this gateway serves at once; more are shed with 429", 256)
    request_timeout: float = doc("seconds a request may take; passed on as the backends' deadline", 600.0)
    requests_per_minute: int = doc("default request rate of a key (0: unlimited)", 600)
    tokens_per_minute: int = doc("default token quota of a key, prompt and completion (0: unlimited)", 200_000)
