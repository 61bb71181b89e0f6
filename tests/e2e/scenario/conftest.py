"""The scenario's target (LLMP_E2E_TARGET: local, the default, or kind) and an HTTP client on its gateway."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.scenario import targets

TARGET = os.environ.get("LLMP_E2E_TARGET", "local")


@pytest.fixture(scope="package")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[targets.Target]:
    if TARGET not in ("local", "kind"):
        pytest.fail(f"LLMP_E2E_TARGET is {TARGET!r}, not local or kind")
    reason = targets.why_not_local() if TARGET == "local" else targets.why_not_kind()
    if reason:
        pytest.skip(f"scenario on {TARGET}: {reason}")
    with targets.local(tmp_path_factory.mktemp("llmp")) if TARGET == "local" else targets.kind() as found:
        yield found


class Gateway:
    """The platform API (/api/v1) over HTTP with a key, and its server-sent event streams."""

    def __init__(self, target: targets.Target) -> None:
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


@pytest.fixture(scope="package")
def gateway(target: targets.Target) -> Iterator[Gateway]:
    client = Gateway(target)
    yield client
    client.http.close()
