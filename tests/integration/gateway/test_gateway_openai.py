"""The official `openai` package against the real gateway, in front of real inference and
retrieval services: models, completions and chat (stream and not), embeddings, vLLM's
tokenize/detokenize, the package's exceptions on bad requests with nothing started behind, and a
client that hangs up (streaming or not) cancelling the backend's work."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import grpc
import httpx
import openai
import pytest
from llmp.inference.v1 import inference_pb2 as ipb
from llmp.retrieval.v1 import retrieval_pb2 as rpb
from llmp.retrieval.v1 import retrieval_pb2_grpc as rpb_grpc

from libs.common.clients.inference import InferenceClient
from tests.helpers.runtime import NEEDS_PRELOADS, missing_preloads
from tests.integration.gateway.stack import GatewayStack, call, create_key

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(full_stack: GatewayStack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=full_stack.http + "/v1", api_key=full_stack.admin_key, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def inference(full_stack: GatewayStack) -> Iterator[InferenceClient]:
    direct = InferenceClient(full_stack.services["inference"].address)
    yield direct
    direct.close()


def idle(inference: InferenceClient) -> bool:
    load = inference.model("tiny").load
    return load.requests_in_flight == 0 and load.running == 0 and load.kv_cache_usage == 0


def wait_idle(inference: InferenceClient, within: float = 1.0) -> None:
    """The issue's bound: the backend request is gone within a second of the client leaving."""
    end = time.monotonic() + within
    while not idle(inference):
        assert time.monotonic() < end, f"still running: {inference.model('tiny').load}"
        time.sleep(0.02)


@NEEDS_PRELOADS
def test_the_in_process_engine_runs_with_the_preloaded_runtime(full_stack: GatewayStack) -> None:
    """The inference service of the local backend started itself again with runtime.preloads loaded."""
    assert missing_preloads(full_stack.services["inference"].proc.pid) == []


def test_models(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"] and models.data[0].owned_by == "llmp"
    assert client.models.retrieve("tiny").id == "tiny"


def test_completions_equal_the_backend_and_stream_the_same_text(
    client: openai.OpenAI, inference: InferenceClient
) -> None:
    reply = client.completions.create(
        model="tiny", prompt="Hello", max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    direct = inference.generate("tiny", text="Hello", max_tokens=12, temperature=0, ignore_eos=True)
    choice = reply.choices[0]
    assert choice.text == direct.completions[0].text and choice.finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (5, 12, 17)
    chunks = list(
        client.completions.create(
            model="tiny", prompt="Hello", max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_sampling_options_reach_the_engine(client: openai.OpenAI) -> None:
    def sample(seed: int) -> list[str]:
        reply = client.completions.create(model="tiny", prompt="abc", max_tokens=8, n=2, seed=seed, temperature=1.0)
        return [c.text for c in sorted(reply.choices, key=lambda c: c.index)]

    assert sample(7) == sample(7) and sample(7) != sample(8)
    reply = client.completions.create(model="tiny", prompt="abc", max_tokens=4, temperature=0, logprobs=2)
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == 4 and all(len(top) >= 2 for top in lp.top_logprobs)
    assert all(v <= 0 for v in lp.token_logprobs)
    first = client.completions.create(model="tiny", prompt="abc", max_tokens=8, temperature=0).choices[0].text
    stop = first[2:4]
    if stop:
        stopped = client.completions.create(model="tiny", prompt="abc", max_tokens=8, temperature=0, stop=[stop])
        assert stop not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"


def test_chat_completions_stream_and_not(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Say hi"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    assert reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens == 6
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=6, temperature=0, stream=True,
            stream_options={"include_usage": True}, logprobs=True, top_logprobs=2,
        )
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content and chunks[-1].usage.total_tokens == reply.usage.total_tokens


def test_embeddings_equal_the_retrieval_service(client: openai.OpenAI, full_stack: GatewayStack) -> None:
    texts = ["The cat sat on the mat.", "Quantum chromodynamics"]
    reply = client.embeddings.create(model="sentence_transformers", input=texts)  # base64 on the wire
    as_floats = client.embeddings.create(model="sentence_transformers", input=texts, encoding_format="float")
    with grpc.insecure_channel(full_stack.services["retrieval"].address) as ch:
        spec = {"type": "sentence_transformers"}
        from google.protobuf import struct_pb2

        embedder = struct_pb2.Struct()
        embedder.update(spec)
        direct = rpb_grpc.RetrievalServiceStub(ch).Embed(rpb.EmbedRequest(texts=texts, embedder=embedder))
    assert len(reply.data) == 2 and len(reply.data[0].embedding) == direct.dim == 384
    for ours, floats, theirs in zip(reply.data, as_floats.data, direct.vectors, strict=True):
        assert ours.embedding == pytest.approx(list(theirs.values), abs=1e-6)
        assert floats.embedding == pytest.approx(list(theirs.values), abs=1e-6)
    assert reply.usage.prompt_tokens == direct.tokens > 0


def test_tokenize_and_detokenize(full_stack: GatewayStack) -> None:
    key = full_stack.admin_key
    status, _, body = call(full_stack, "POST", "/tokenize", key, {"model": "tiny", "prompt": "héllo"})
    assert status == 200 and body["count"] == 6 and body["max_model_len"] == 1024  # one id per UTF-8 byte
    assert call(full_stack, "POST", "/detokenize", key, {"model": "tiny", "tokens": body["tokens"]})[2] == {
        "prompt": "héllo"
    }
    messages = [{"role": "user", "content": "hi"}]
    status, _, chat = call(full_stack, "POST", "/tokenize", key, {"model": "tiny", "messages": messages})
    rendered = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert status == 200 and chat["count"] == len(rendered.encode())
    status, _, body = call(full_stack, "POST", "/detokenize", key, {"model": "tiny", "tokens": [300]})
    assert status == 400 and body["error"]["param"] == "tokens"


def test_bad_requests_raise_the_packages_exceptions_and_start_nothing(
    client: openai.OpenAI, full_stack: GatewayStack
) -> None:
    before = full_stack.backend_calls("inference", "Generate")
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="tiny", prompt="x", temperature=3)
    assert bad.value.param == "temperature" and bad.value.code is None
    for field, value in (("top_p", 1.5), ("n", 0), ("max_tokens", 0), ("presence_penalty", 9), ("logprobs", 99)):
        with pytest.raises(openai.BadRequestError) as bad:
            client.completions.create(model="tiny", prompt="x", **{field: value})
        assert bad.value.param == field
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": "an object"}},
        )  # fmt: skip
    assert bad.value.param == "response_format.json_schema.schema"
    stranger = openai.OpenAI(base_url=full_stack.http + "/v1", api_key="llmp_bad_key", max_retries=0)
    with stranger, pytest.raises(openai.AuthenticationError):
        stranger.completions.create(model="tiny", prompt="x")
    retrieval_only = create_key(full_stack, ["retrieval"])
    narrow = openai.OpenAI(base_url=full_stack.http + "/v1", api_key=retrieval_only, max_retries=0)
    with narrow, pytest.raises(openai.PermissionDeniedError):
        narrow.completions.create(model="tiny", prompt="x")
    once = create_key(full_stack, ["inference"], requests_per_minute=1)
    with openai.OpenAI(base_url=full_stack.http + "/v1", api_key=once, max_retries=0) as limited:
        limited.models.list()
        with pytest.raises(openai.RateLimitError) as limit:
            limited.completions.create(model="tiny", prompt="x")
    assert int(limit.value.response.headers["retry-after"]) >= 1
    status, _, body = call(full_stack, "POST", "/v1/completions", full_stack.admin_key, raw=b'{"model": "tiny", ')
    assert status == 400 and body["error"]["param"] == "body"
    assert full_stack.backend_calls("inference", "Generate") == before  # none of these reached the engine
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="no-such-model", prompt="x")
    assert missing.value.param == "model"


def test_a_client_that_hangs_up_mid_stream_cancels_the_generation(
    full_stack: GatewayStack, inference: InferenceClient
) -> None:
    wait_idle(inference, within=30)
    body = {"model": "tiny", "prompt": "Once", "max_tokens": 1000, "n": 4, "ignore_eos": True, "stream": True}
    headers = {"authorization": f"Bearer {full_stack.admin_key}"}
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", full_stack.http + "/v1/completions", json=body, headers=headers) as reply,
    ):
        lines = reply.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["text"] is not None
        assert inference.model("tiny").load.requests_in_flight == 1
    # the connection is closed here, mid-stream
    wait_idle(inference)


def test_a_client_that_hangs_up_before_the_answer_cancels_the_generation(
    full_stack: GatewayStack, inference: InferenceClient
) -> None:
    wait_idle(inference, within=30)
    payload = json.dumps({"model": "tiny", "prompt": "Once", "max_tokens": 1000, "n": 4, "ignore_eos": True}).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"authorization: Bearer {full_stack.admin_key}\r\ncontent-length: {len(payload)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", int(full_stack.http.rsplit(":", 1)[1]))) as s:
        s.sendall(head.encode() + payload)
        end = time.monotonic() + 30
        while inference.model("tiny").load.requests_in_flight == 0:
            assert time.monotonic() < end
            time.sleep(0.01)
    wait_idle(inference)


def test_the_request_timeout_is_the_backends_deadline(full_stack: GatewayStack, inference: InferenceClient) -> None:
    wait_idle(inference, within=30)
    body = {"model": "tiny", "prompt": "Once", "max_tokens": 1000, "ignore_eos": True}
    status, headers, reply = call(
        full_stack, "POST", "/v1/completions", full_stack.admin_key, body, headers={"x-request-timeout": "0.2"}
    )
    assert status == 504 and reply["error"]["type"] == "timeout" and headers["x-request-id"]
    wait_idle(inference)
    status, _, reply = call(full_stack, "GET", "/v1/models", full_stack.admin_key, headers={"x-request-timeout": "-1"})
    assert status == 400 and reply["error"]["param"] == "X-Request-Timeout"
    assert ipb.ModelInfo  # the proto module the gateway answers from


def test_over_grpc_a_cancelled_stream_and_a_passed_deadline_stop_the_backend(
    full_stack: GatewayStack, inference: InferenceClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    wait_idle(inference, within=30)
    monkeypatch.setenv("LLMP_API_KEY", create_key(full_stack, ["inference"]))
    through = InferenceClient(full_stack.gateway.address)
    stream = through.stub.GenerateStream(
        ipb.GenerateRequest(model="tiny", text="Once", max_tokens=1000, ignore_eos=True)
    )
    next(stream)
    assert inference.model("tiny").load.requests_in_flight == 1
    stream.cancel()
    wait_idle(inference)
    with pytest.raises(grpc.RpcError) as e:
        through.stub.Generate(
            ipb.GenerateRequest(model="tiny", text="Once", max_tokens=1000, ignore_eos=True), timeout=0.3
        )
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_idle(inference)
    through.close()


def test_a_token_quota_admits_until_spent(full_stack: GatewayStack) -> None:
    key = create_key(full_stack, ["inference"], tokens_per_minute=30)
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 12, "ignore_eos": True}
    assert call(full_stack, "POST", "/v1/completions", key, body)[0] == 200  # 17 tokens: 13 left
    assert call(full_stack, "POST", "/v1/completions", key, body)[0] == 200  # 13 - 17: the bucket is 4 in debt
    status, headers, reply = call(full_stack, "POST", "/v1/completions", key, body)
    assert status == 429 and "30 tokens per minute" in reply["error"]["message"]
    assert int(headers["retry-after"]) >= 1


def test_the_request_id_reaches_the_backend(full_stack: GatewayStack) -> None:
    body = {"model": "no-such-model", "prompt": "x"}
    status, headers, _ = call(
        full_stack, "POST", "/v1/completions", full_stack.admin_key, body, headers={"x-request-id": "trace-me-42"}
    )
    assert status == 404 and headers["x-request-id"] == "trace-me-42"
    assert "[trace-me-42] Generate refused" in full_stack.services["inference"].output()
