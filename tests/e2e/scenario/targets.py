"""Where the scenario runs: the local stack of processes (`llmp up`) or the kind cluster (`make kind-up`).

Both give the same thing, the gateway's HTTP base URL and an admin key; LLMP_E2E_TARGET picks one
(`local`, the default, or `kind`).
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from libs.common.ports import free_port
from tests.helpers.services import ROOT

TARGET = os.environ.get("LLMP_E2E_TARGET", "local")
"""Where the scenario runs: local (the default) or kind."""

KIND_CONTEXT = os.environ.get("LLMP_KIND_CONTEXT", "kind-llmp")
KIND_NAMESPACE = os.environ.get("LLMP_KIND_NAMESPACE", "llmp")
RELEASE = os.environ.get("LLMP_KIND_RELEASE", "llmp")
SERVICES = ("gateway", "tokenizer", "retrieval", "training", "inference")


@dataclass
class Target:
    name: str
    base_url: str
    admin_key: str
    kubectl: Callable[..., subprocess.CompletedProcess[str]] | None = None
    """kind only: kubectl in the release's namespace."""
    notes: list[str] = field(default_factory=list)


def why_not_local() -> str | None:
    if importlib.util.find_spec("services.gateway") is None:
        return "the gateway service (services.gateway) is not installed here; the scenario goes through it"
    return None


def why_not_kind() -> str | None:
    if not shutil.which("kubectl"):
        return "kubectl is not installed"
    probe = subprocess.run(
        ["kubectl", "--context", KIND_CONTEXT, "-n", KIND_NAMESPACE, "get", "deploy", f"{RELEASE}-gateway"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return f"no kind cluster {KIND_CONTEXT} with the {RELEASE} release (make kind-up): {probe.stderr.strip()}"
    return None


def wait_port(port: int, alive: Callable[[], bool], timeout_s: float) -> None:
    """Until something accepts on 127.0.0.1:port (a port-forward or the gateway coming up)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and alive():
        with socket.socket() as s:
            s.settimeout(1.0)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


@contextmanager
def local(home: Path) -> Iterator[Target]:
    """`llmp up` in a fresh LLMP_HOME, every port free, an admin key of its own; `llmp down` after."""
    key = secrets.token_urlsafe(24)
    env = {**os.environ, "LLMP_HOME": str(home), "LLMP_GATEWAY_ADMIN_KEY": key, "COLUMNS": "200"}
    for name in ("LLMP_REDIS_PORT", "LLMP_RAY_PORT", "LLMP_RAY_DASHBOARD_PORT", "LLMP_GATEWAY_HTTP_PORT"):
        env[name] = str(free_port())
    for service in SERVICES:
        port = free_port()
        env |= {
            f"LLMP_{service.upper()}_PORT": str(port),
            f"LLMP_{service.upper()}_ADDRESS": f"127.0.0.1:{port}",
            f"LLMP_{service.upper()}_METRICS_PORT": "-1",
        }

    def llmp(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", "from libs.common.cli import main; main()", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )

    up = llmp("up")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield Target("local", f"http://127.0.0.1:{env['LLMP_GATEWAY_HTTP_PORT']}", key)
    finally:
        llmp("down")


@contextmanager
def kind() -> Iterator[Target]:
    """The release on the kind cluster, its gateway port-forwarded to a free local port."""

    def kubectl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = ["kubectl", "--context", KIND_CONTEXT, "-n", KIND_NAMESPACE, *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=check)

    secret = kubectl("get", "secret", f"{RELEASE}-secrets", "-o", "jsonpath={.data.admin-key}").stdout
    port = free_port()
    forward = subprocess.Popen(
        [
            "kubectl",
            "--context",
            KIND_CONTEXT,
            "-n",
            KIND_NAMESPACE,
            "port-forward",
            f"svc/{RELEASE}-gateway",
            f"{port}:8000",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, lambda: forward.poll() is None, 60)
        yield Target("kind", f"http://127.0.0.1:{port}", base64.b64decode(secret).decode(), kubectl=kubectl)
    finally:
        forward.terminate()
        forward.wait(30)


class Gateway:
    """The platform API (/api/v1) over HTTP with a key, and its server-sent event streams."""

    def __init__(self, target: Target) -> None:
        import httpx

        self.http = httpx.Client(
            base_url=target.base_url,
            headers={"Authorization": f"Bearer {target.admin_key}"},
            timeout=httpx.Timeout(60.0, read=1800.0),
        )

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, expect: int = 200) -> Any:
        response = self.http.request(method, f"/api/v1{path}", json=body)
        assert response.status_code == expect, f"{method} {path}: {response.status_code} {response.text[:500]}"
        return response.json()

    def events(self, method: str, path: str, body: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Every event of an SSE stream until the server ends it; an error event fails the step."""
        out: list[dict[str, Any]] = []
        with self.http.stream(method, f"/api/v1{path}", json=body) as response:
            assert response.status_code == 200, f"{method} {path}: {response.status_code} {response.read()[:500]!r}"
            kind = "message"
            for line in response.iter_lines():
                if line.startswith("event:"):
                    kind = line.removeprefix("event:").strip()
                elif line.startswith("data:"):
                    data = json.loads(line.removeprefix("data:"))
                    assert kind != "error", f"{path}: {data}"
                    out.append(data)
        return out
