"""Prometheus metrics of every gRPC server (requests, latency, errors and in-flight calls per method)."""

from __future__ import annotations

import errno
import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from libs.common.ports import PortInUse

log = logging.getLogger(__name__)

REQUESTS = Counter("llmp_grpc_requests", "gRPC calls finished", ["service", "method", "code"])
LATENCY = Histogram(
    "llmp_grpc_request_seconds",
    "gRPC call duration in seconds",
    ["service", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
IN_FLIGHT = Gauge("llmp_grpc_in_flight", "gRPC calls in progress", ["service", "method"])
SERVING = Gauge("llmp_serving", "1 when the service reports SERVING", ["service"])


def serve_metrics(host: str, port: int, variable: str = "the metrics port") -> None:
    """Expose /metrics over HTTP; port -1 turns it off. A taken port raises PortInUse naming `variable`."""
    if port < 0:
        return
    try:
        start_http_server(port, addr=host)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise PortInUse(port, variable) from None
        raise
    log.info("metrics on http://%s:%d/metrics", host, port)
