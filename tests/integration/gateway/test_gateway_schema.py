"""A property-based run over the gateway's OpenAPI document (schemathesis): every operation is
called with generated bodies, parameters and paths, valid and not, on the real stack; none may
answer with a server error (5xx).

Left out, with the reason: the training and registry routes (the training service, which needs Ray, is not
part of this stack, so they answer 503 by design), training a tokeniser and loading a model
(generated values would start minutes of CPU work on shared cores; their validation is the same
pydantic edge as every other body and is tested in the other modules).
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from services.gateway import openapi
from tests.integration.gateway.stack import GatewayStack, create_key

pytestmark = pytest.mark.integration

schema = (
    schemathesis.openapi.from_path(openapi.PATH)
    .exclude(tag="training")
    .exclude(path_regex="^/api/v1/models")
    .exclude(path="/api/v1/tokenizers", method="POST")
    .exclude(path="/api/v1/served", method="POST")
)
_keys: dict[str, str] = {}


def unlimited_key(stack: GatewayStack) -> str:
    if "key" not in _keys:
        _keys["key"] = create_key(stack, ["admin"], requests_per_minute=0, tokens_per_minute=0)
    return _keys["key"]


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_operation_answers_with_a_server_error(case: schemathesis.Case, full_stack: GatewayStack) -> None:
    response = case.call(base_url=full_stack.http, headers={"authorization": f"Bearer {unlimited_key(full_stack)}"},
                         timeout=120)  # fmt: skip
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} {response.text}"
