"""Prometheus metrics of the gateway's HTTP side (the gRPC side uses the server kit's)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

REQUESTS = Counter("llmp_gateway_http_requests", "HTTP requests answered", ["route", "status"])
LATENCY = Histogram(
    "llmp_gateway_http_request_seconds",
    "HTTP request duration in seconds (to the last byte)",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
SHED = Counter("llmp_gateway_shed", "requests refused because the gateway was at its in-flight cap")
DISCONNECTS = Counter("llmp_gateway_disconnects", "requests whose client went away before the answer was complete")
QUOTA_REFUSED = Counter("llmp_gateway_quota_refused", "requests refused by a key's quota")
TOKENS = Counter("llmp_gateway_tokens", "tokens served, by kind", ["kind"])
