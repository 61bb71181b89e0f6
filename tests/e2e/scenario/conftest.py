"""The scenario's target (LLMP_E2E_TARGET: local, the default, or kind) and an HTTP client on its gateway."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.scenario import targets
from tests.e2e.scenario.targets import TARGET, Gateway


@pytest.fixture(scope="package")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[targets.Target]:
    if TARGET not in ("local", "kind"):
        pytest.fail(f"LLMP_E2E_TARGET is {TARGET!r}, not local or kind")
    reason = targets.why_not_local() if TARGET == "local" else targets.why_not_kind()
    if reason:
        pytest.skip(f"scenario on {TARGET}: {reason}")
    with targets.local(tmp_path_factory.mktemp("llmp")) if TARGET == "local" else targets.kind() as found:
        yield found


@pytest.fixture(scope="package")
def gateway(target: targets.Target) -> Iterator[Gateway]:
    client = Gateway(target)
    yield client
    client.http.close()
