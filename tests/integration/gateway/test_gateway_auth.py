"""The gateway's guard as a real process over real sockets, with a real Redis and no backends
running (their addresses lead nowhere): keys on every route and RPC, scopes, quotas with
Retry-After, body limits, invalid JSON, load shedding, request ids, a down backend answered fast
while other routes work, `llmp keys`, and the OpenAPI file kept in step with what is served."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import empty_pb2

from services.gateway import openapi
from services.gateway.grpc_api import BACKEND_SERVICES
from tests.helpers.services import ROOT
from tests.integration.gateway.stack import GatewayStack, call, create_key, start_stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayStack]:
    env = {
        "LLMP_GATEWAY_MAX_BODY_BYTES": "4096",
        "LLMP_GATEWAY_MAX_IN_FLIGHT": "4",
        "LLMP_GATEWAY_MAX_MESSAGE_BYTES": "65536",
    }
    stack = start_stack(tmp_path_factory.mktemp("llmp"), {}, env)
    yield stack
    stack.close()


def operations() -> list[tuple[str, str, str]]:
    """(method, concrete path, scope tag) of every operation in the OpenAPI document."""
    out = []
    for path, item in openapi.document()["paths"].items():
        for method, op in item.items():
            out.append((method.upper(), re.sub(r"\{[^}]+\}", "x", path), op.get("tags", [""])[0]))
    return out


def read_reply(s: socket.socket) -> str:
    """Headers and body of one HTTP reply (its Content-Length says when it is whole)."""
    s.settimeout(30)
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
        re.search(rb"content-length: (\d+)", data, re.I).group(1)  # type: ignore[union-attr]
    ):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.decode()


def assert_envelope(body: dict, status: int, reply_status: int, param: str | None = None) -> None:
    assert reply_status == status, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error


def test_health_and_metrics_need_no_key(stack: GatewayStack) -> None:
    assert call(stack, "GET", "/health")[2] == {"status": "SERVING"}
    status, _, text = call(stack, "GET", "/metrics")
    assert status == 200 and "llmp_gateway_shed_total" in text


def test_every_other_route_refuses_a_missing_invalid_or_revoked_key(stack: GatewayStack) -> None:
    revoked = create_key(stack, ["admin"])
    key_id = revoked.split("_")[1]
    assert call(stack, "DELETE", f"/api/v1/keys/{key_id}", stack.admin_key)[0] == 200
    ops = [op for op in operations() if op[1] not in ("/health", "/metrics")]
    assert len(ops) >= 40
    for method, path, _ in [*ops, ("GET", "/no/such/route", ""), ("GET", "/openapi.json", ""), ("GET", "/docs", "")]:
        for key in (None, "llmp_nope_invalid", revoked):
            status, _, body = call(stack, method, path, key, body={})
            assert_envelope(body, 401, status)
            assert body["error"]["type"] == "authentication_error", (method, path)


def test_a_key_without_the_scope_is_refused(stack: GatewayStack) -> None:
    only_inference = create_key(stack, ["inference"])
    refused = 0
    for method, path, tag in operations():
        if tag in ("tokenizers", "training", "retrieval", "keys") and path != "/api/v1/whoami":
            status, _, body = call(stack, method, path, only_inference, body={})
            assert_envelope(body, 403, status)
            refused += 1
    assert refused >= 20
    status, _, body = call(stack, "POST", "/api/v1/served", only_inference, {"path": "models/x/1"})
    assert_envelope(body, 403, status)  # loading models needs admin
    assert call(stack, "GET", "/api/v1/whoami", only_inference)[2]["scopes"] == ["inference"]


def call_raw(channel: grpc.Channel, path: str, client_streaming: bool, server_streaming: bool) -> None:
    """Call any method with an empty message (no key is sent)."""
    empty = empty_pb2.Empty.SerializeToString
    if client_streaming and server_streaming:
        list(channel.stream_stream(path, empty)(iter([]), timeout=10))
    elif client_streaming:
        channel.stream_unary(path, empty)(iter([]), timeout=10)
    elif server_streaming:
        list(channel.unary_stream(path, empty)(empty_pb2.Empty(), timeout=10))
    else:
        channel.unary_unary(path, empty)(empty_pb2.Empty(), timeout=10)


def test_every_grpc_method_needs_a_key(stack: GatewayStack) -> None:
    from llmp.gateway.v1 import gateway_pb2

    services = [gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"], *BACKEND_SERVICES.values()]
    with grpc.insecure_channel(stack.gateway.address) as channel:
        count = 0
        for service in services:
            for method in service.methods:
                path = f"/{service.full_name}/{method.name}"
                with pytest.raises(grpc.RpcError) as e:
                    call_raw(channel, path, method.client_streaming, method.server_streaming)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, path
                count += 1
        assert count >= 40


def test_grpc_messages_over_the_limit_are_refused(stack: GatewayStack) -> None:
    from libs.common.clients.gateway import GatewayClient

    client = GatewayClient(stack.gateway.address, key=stack.admin_key)
    with pytest.raises(grpc.RpcError) as e:
        client.create_key("x" * 100_000, ["inference"])
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert all(k.name != "x" * 100_000 for k in client.list_keys())
    client.close()


def test_over_quota_is_429_with_retry_after_over_http_and_grpc(stack: GatewayStack) -> None:
    key = create_key(stack, ["admin"], requests_per_minute=2)
    assert call(stack, "GET", "/api/v1/whoami", key)[0] == 200
    assert call(stack, "GET", "/api/v1/whoami", key)[0] == 200
    status, headers, body = call(stack, "GET", "/api/v1/whoami", key)
    assert_envelope(body, 429, status)
    assert body["error"]["type"] == "rate_limit_error" and 1 <= int(headers["retry-after"]) <= 30
    from libs.common.clients.gateway import GatewayClient

    client = GatewayClient(stack.gateway.address, key=key)
    with pytest.raises(grpc.RpcError) as e:
        client.whoami()
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert 1 <= int(dict(e.value.trailing_metadata())["retry-after"]) <= 30
    client.close()


def test_bodies_over_the_limit_and_invalid_json_are_refused(stack: GatewayStack) -> None:
    big = {"model": "m", "prompt": "x" * 5000}
    status, _, body = call(stack, "POST", "/v1/completions", stack.admin_key, big)
    assert_envelope(body, 413, status, "body")
    # without Content-Length (chunked): counted as it arrives
    with socket.create_connection(("127.0.0.1", int(stack.http.rsplit(":", 1)[1]))) as s:
        head = (
            "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"authorization: Bearer {stack.admin_key}\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        s.sendall(head.encode())
        for _ in range(3):
            s.sendall(b"800\r\n" + b"x" * 0x800 + b"\r\n")
        reply = read_reply(s)
    assert reply.startswith("HTTP/1.1 413") and '"param": "body"' in reply
    status, _, body = call(stack, "POST", "/v1/completions", stack.admin_key, raw=b"{not json")
    assert_envelope(body, 400, status, "body")
    status, _, body = call(stack, "POST", "/v1/chat/completions", stack.admin_key, {"model": "m", "messages": []})
    assert_envelope(body, 400, status, "messages")
    status, _, body = call(stack, "POST", "/v1/completions", stack.admin_key, {"model": "m", "prompt": "a", "top_p": 0})
    assert_envelope(body, 400, status, "top_p")
    status, _, body = call(
        stack, "POST", "/v1/chat/completions", stack.admin_key,
        {"model": "m", "messages": [{"role": "user", "content": "hi"}],
         "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
    )  # fmt: skip
    assert_envelope(body, 400, status, "response_format.json_schema.schema")


def test_over_the_in_flight_cap_requests_are_shed_not_queued(stack: GatewayStack) -> None:
    port = int(stack.http.rsplit(":", 1)[1])
    held = []
    head = (
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"authorization: Bearer {stack.admin_key}\r\ncontent-length: 100\r\n\r\n{{"
    )
    try:
        for _ in range(4):  # the cap: four requests whose bodies never finish
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(head.encode())
            held.append(s)
        # the guard counts a request in before its body arrives; wait until the four are counted
        for _ in range(200):
            status, headers, body = call(stack, "GET", "/api/v1/whoami", stack.admin_key)
            if status == 429:
                break
        assert_envelope(body, 429, status)
        assert headers["retry-after"] == "1" and "try again" in body["error"]["message"]
    finally:
        for s in held:
            s.close()
    for _ in range(200):  # the held requests end when their clients go away
        if call(stack, "GET", "/api/v1/whoami", stack.admin_key)[0] == 200:
            break
    else:
        pytest.fail("the gateway did not take requests again")


def test_request_ids_and_a_down_backend(stack: GatewayStack) -> None:
    status, headers, body = call(stack, "GET", "/v1/models", stack.admin_key, headers={"x-request-id": "abc-123"})
    assert_envelope(body, 503, status)
    assert headers["x-request-id"] == "abc-123" and "inference" in body["error"]["message"]
    status, headers, body = call(stack, "POST", "/api/v1/plan/compute", stack.admin_key, {"flops": 1e21})
    assert status == 200 and len(headers["x-request-id"]) == 16 and body["rows"][0]["parameters"] > 1e9
    odd = call(stack, "GET", "/api/v1/whoami", stack.admin_key, headers={"x-request-id": "a b\u00e9" + "x" * 80})[1]
    assert len(odd["x-request-id"]) == 16  # not plain: replaced, never passed on
    _, _, text = call(stack, "GET", "/metrics")
    assert 'llmp_gateway_http_requests_total{route="/api/v1/plan/compute",status="200"}' in text
    status, _, body = call(stack, "POST", "/api/v1/plan/memory", stack.admin_key, {"preset": "llama-3-8b"})
    assert status == 200 and body["kv_bytes_per_token"]["bf16"] == 131072


def test_llmp_keys_command_line(stack: GatewayStack) -> None:
    env = {**os.environ, "LLMP_HOME": str(stack.home), "LLMP_GATEWAY_ADDRESS": stack.gateway.address, "COLUMNS": "250"}
    env.pop("LLMP_API_KEY", None)

    def llmp(*args: str) -> str:
        argv = [str(Path(sys.executable).parent / "llmp"), *args]
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    out = llmp("keys", "create", "cli-made", "--scope", "retrieval", "--ttl", "3600")
    key = out.strip().splitlines()[-1]
    key_id = key.split("_")[1]
    assert call(stack, "GET", "/api/v1/whoami", key)[2]["scopes"] == ["retrieval"]
    assert "cli-made" in llmp("keys", "list") and key not in llmp("keys", "list")
    llmp("keys", "revoke", key_id)
    assert call(stack, "GET", "/api/v1/whoami", key)[0] == 401


def test_the_openapi_file_is_what_the_gateway_serves(stack: GatewayStack) -> None:
    status, _, served = call(stack, "GET", "/openapi.json", stack.admin_key)
    assert status == 200
    kept = json.loads(Path(openapi.PATH).read_text())
    assert served == kept, "services/gateway/openapi.json is stale: run python -m services.gateway.openapi"
