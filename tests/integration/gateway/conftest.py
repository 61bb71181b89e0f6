"""One gateway stack shared by the gateway modules that need models: the inference service (its
in-process backend: the same engine and gRPC front as on Ray Serve, without starting Ray on two
shared cores), retrieval and tokenizer, with a tiny Llama served as "tiny"."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.gateway.stack import TINY, GatewayStack, call, save_tiny_model, start_stack


@pytest.fixture(scope="session")
def full_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayStack]:
    home = tmp_path_factory.mktemp("llmp")
    save_tiny_model(home / "artifacts")
    services = {
        "inference": {"LLMP_INFERENCE_BACKEND": "local", "LLMP_INFERENCE_MAX_TOKENS": "1024"},
        "retrieval": {"LLMP_RETRIEVAL_RAY": "off"},
        "tokenizer": {},
    }
    stack = start_stack(home, services)
    try:
        status, _, body = call(stack, "POST", "/api/v1/served", stack.admin_key, {"path": TINY})
        assert status == 201 and body["name"] == "tiny", body
        yield stack
    finally:
        stack.close()
