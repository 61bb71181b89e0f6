"""Real processes for the gateway tests: Redis, the gateway, and the services behind it.

Every process listens on loopback on free ports and shares one LLMP_HOME (so the artifact store
is common, as in the local stack). Services not started are given a free port nobody listens on,
so their routes answer 503 while the rest work.
"""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from libs.common.ports import free_port
from tests.helpers.redis_server import RedisServer
from tests.helpers.services import ServiceProcess, start_service
from tests.helpers.tiny_models import CHAT_TEMPLATE, TINY
from tests.helpers.tiny_models import save_tiny_model as save_tiny_model_with


def save_tiny_model(root: Path, relative: str = TINY, context: int = 1024) -> Path:
    """The tiny byte-level Llama with a chat template and room for a cited prompt."""
    return save_tiny_model_with(root, relative, context=context, chat_template=CHAT_TEMPLATE)


@dataclass
class GatewayStack:
    home: Path
    redis: RedisServer
    gateway: ServiceProcess
    http: str
    admin_key: str
    services: dict[str, ServiceProcess] = field(default_factory=dict)
    metrics_ports: dict[str, int] = field(default_factory=dict)

    def backend_calls(self, service: str, method: str) -> float:
        """How many calls of `method` the backend has finished (its Prometheus counter)."""
        port = self.metrics_ports[service]
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith("llmp_grpc_requests_total{") and f'method="{method}"' in line:
                total += float(line.rsplit(" ", 1)[1])
        return total

    def close(self) -> None:
        self.gateway.stop()
        for service in self.services.values():
            service.stop()
        self.redis.stop()


def start_stack(
    home: Path, services: dict[str, dict[str, str]], gateway_env: dict[str, str] | None = None
) -> GatewayStack:
    """Redis, the named services (name -> extra env), then the gateway in front of them."""
    redis = RedisServer(home).start()
    started: dict[str, ServiceProcess] = {}
    metrics = {name: free_port() for name in services}
    try:
        for name, env in services.items():
            env = {"LLMP_REDIS_URL": redis.url, **env}
            started[name] = start_service(name, home, extra_env=env, metrics_port=metrics[name])
        addresses = {
            f"LLMP_{name.upper()}_ADDRESS": started[name].address if name in started else f"127.0.0.1:{free_port()}"
            for name in ("tokenizer", "retrieval", "training", "inference")
        }
        http_port = free_port()
        env = {
            "LLMP_REDIS_URL": redis.url,
            "LLMP_GATEWAY_HTTP_PORT": str(http_port),
            **addresses,
            **(gateway_env or {}),
        }
        gateway = start_service("gateway", home, extra_env=env)
    except BaseException:
        for service in started.values():
            service.stop()
        redis.stop()
        raise
    admin = (home / "secrets" / "admin.key").read_text().strip()
    return GatewayStack(home, redis, gateway, f"http://127.0.0.1:{http_port}", admin, started, metrics)


def call(
    stack: GatewayStack, method: str, path: str, key: str | None = None, body: Any = None,
    headers: dict[str, str] | None = None, raw: bytes | None = None,
) -> tuple[int, dict[str, str], Any]:  # fmt: skip
    """One HTTP request: (status, headers, JSON body or text)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(stack.http + path, data=data, method=method)
    request.add_header("content-type", "application/json")
    if key:
        request.add_header("authorization", f"Bearer {key}")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            status, reply_headers, text = reply.status, dict(reply.headers), reply.read().decode()
    except urllib.error.HTTPError as e:
        status, reply_headers, text = e.code, dict(e.headers), e.read().decode()
    try:
        return status, {k.lower(): v for k, v in reply_headers.items()}, json.loads(text)
    except json.JSONDecodeError:
        return status, {k.lower(): v for k, v in reply_headers.items()}, text


def create_key(stack: GatewayStack, scopes: list[str], **limits: Any) -> str:
    status, _, body = call(stack, "POST", "/api/v1/keys", stack.admin_key, {"name": "test", "scopes": scopes, **limits})
    assert status == 201, body
    return str(body["key"])
