"""The inference service as a real process over real gRPC, on a real local Ray Serve.

One service process (local Ray with 2 CPUs, no dashboard) serves a tiny Llama from the artifact
store: generation equal to the in-process engine's, cancellation and Abort freeing the KV cache,
overload refused, bad input refused with the field named, health, reflection and SIGTERM drain.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator

import grpc
import psutil
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from llmp.inference.v1 import inference_pb2 as pb
from llmp.inference.v1 import inference_pb2_grpc as pb_grpc
from peft import LoraConfig, get_peft_model
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM

from libs.common.artifacts import ArtifactStore
from libs.common.ports import free_port
from services.inference import runtime
from services.inference.engine import LLMEngine, SamplingParams, load_model
from tests.helpers.runtime import NEEDS_PRELOADS, missing_preloads
from tests.helpers.services import ServiceProcess, start_service
from tests.helpers.tiny_models import TINY, save_tiny_model

pytestmark = pytest.mark.integration

PROMPT = [5, 17, 99, 3, 42]
LIGHT = pb.ReplicaOptions(num_cpus=0.5)
LONG = 100_000
"""Tokens of a request that runs far longer than any wait here (the service's max_tokens cap)."""
STRETCHED = pb.EngineOptions(rope_scaling=json.dumps({"rope_type": "linear", "factor": 1024}))
"""The tiny model's context stretched by RoPE scaling (128 -> 131,072 tokens) to hold a LONG request."""


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    home = tmp_path_factory.mktemp("llmp")
    save_tiny_model(home / "artifacts")
    env = {
        "LLMP_INFERENCE_RAY_NUM_CPUS": "2",
        "LLMP_INFERENCE_DASHBOARD": "false",
        "LLMP_INFERENCE_MAX_TOKENS": str(LONG),
    }
    service = start_service("inference", home, extra_env=env, metrics_port=free_port())
    yield service
    service.stop()


@pytest.fixture(scope="module")
def stub(service: ServiceProcess) -> Iterator[pb_grpc.InferenceServiceStub]:
    with grpc.insecure_channel(service.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        stub.LoadModel(pb.LoadModelRequest(path=TINY, replicas=LIGHT), timeout=120)
        yield stub


@pytest.fixture
def long(stub: pb_grpc.InferenceServiceStub) -> Iterator[str]:
    """The tiny model STRETCHED, so a request of LONG tokens runs for minutes: a test that stops one
    mid-way cannot lose the race to its natural end, however fast the machine."""
    stub.LoadModel(pb.LoadModelRequest(path=TINY, name="long", replicas=LIGHT, engine=STRETCHED), timeout=120)
    yield "long"
    stub.UnloadModel(pb.UnloadModelRequest(model="long"), timeout=120)


def greedy(max_tokens: int, **fields: object) -> pb.GenerateRequest:
    fields = {"model": "tiny", **fields}
    return pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=PROMPT), max_tokens=max_tokens, temperature=0, ignore_eos=True, **fields
    )


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.05)


def idle(stub: pb_grpc.InferenceServiceStub, model: str = "tiny") -> bool:
    load = stub.GetModelInfo(pb.GetModelInfoRequest(model=model)).load
    return load.replicas >= 1 and load.kv_cache_usage == 0 and load.running == 0 and load.requests_in_flight == 0


def replica_calls(service: ServiceProcess, model: str) -> float:
    """The front's count of calls to the model's replicas (its metrics endpoint)."""
    with urllib.request.urlopen(f"http://{service.metrics_address}/metrics", timeout=10) as reply:
        for family in text_string_to_metric_families(reply.read().decode()):
            if family.name == "llmp_replica_calls":
                return sum(s.value for s in family.samples if s.labels.get("model") == model)
    return 0.0


def test_health_and_reflection(service: ServiceProcess) -> None:
    with grpc.insecure_channel(service.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        name = "llmp.inference.v1.InferenceService"
        reply = health.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        answer = next(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([request])))
        assert name in [s.name for s in answer.list_services_response.service]


def test_model_and_server_info(stub: pb_grpc.InferenceServiceStub) -> None:
    info = stub.GetModelInfo(pb.GetModelInfoRequest(model="tiny"))
    assert (info.model_type, info.context_length, info.quantization, info.has_tokenizer) == ("llama", 128, "none", True)
    assert info.replicas.max_ongoing_requests == 64 and info.replicas.num_cpus == 0.5
    server = stub.GetServerInfo(pb.GetServerInfoRequest())
    assert server.backend == "ray-serve" and list(server.models) == ["tiny"]
    assert [m.name for m in stub.ListModels(pb.ListModelsRequest()).models] == ["tiny"]


def test_generation_equals_the_in_process_engine(service: ServiceProcess, stub: pb_grpc.InferenceServiceStub) -> None:
    engine = LLMEngine(load_model(TINY, ArtifactStore(service.home / "artifacts")))
    expected = engine.generate([PROMPT], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    unary = stub.Generate(greedy(20))
    assert list(unary.completions[0].token_ids) == expected.outputs[0].token_ids
    assert unary.usage.prompt_tokens == len(PROMPT) and unary.usage.completion_tokens == 20
    messages = list(stub.GenerateStream(greedy(20)))
    assert len(messages) > 1
    assert [t for m in messages for t in m.completions[0].token_ids] == expected.outputs[0].token_ids
    assert "".join(m.completions[0].text for m in messages) == unary.completions[0].text
    assert messages[-1].completions[0].finish_reason == "length" and messages[-1].usage.completion_tokens == 20
    text = stub.Generate(pb.GenerateRequest(model="tiny", text="hello", max_tokens=4, temperature=0))
    assert text.usage.prompt_tokens == 5 and len(text.completions[0].token_ids) == 4


def test_requests_that_arrive_together_share_calls_and_keep_their_own_replies(
    service: ServiceProcess, stub: pb_grpc.InferenceServiceStub
) -> None:
    """Requests sent at once reach the replica in fewer calls than requests (the front gathers them),
    and every one still gets exactly its own tokens, streamed or whole, as the engine gives them alone."""
    engine = LLMEngine(load_model(TINY, ArtifactStore(service.home / "artifacts")))
    prompts = [[5 + i, 17, 99 - i, 3] for i in range(12)]
    lengths = [4 + 3 * i for i in range(12)]
    expected = [
        engine.generate([p], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))[0].outputs[0].token_ids
        for p, n in zip(prompts, lengths, strict=True)
    ]
    before = replica_calls(service, "tiny")

    def request(i: int) -> pb.GenerateRequest:
        return pb.GenerateRequest(model="tiny", token_ids=pb.TokenIds(ids=prompts[i]), max_tokens=lengths[i],
                                  temperature=0, ignore_eos=True)  # fmt: skip

    whole = {i: stub.Generate.future(request(i)) for i in range(0, 12, 2)}
    streams = {i: stub.GenerateStream(request(i)) for i in range(1, 12, 2)}
    got = {i: list(f.result(timeout=60).completions[0].token_ids) for i, f in whole.items()}
    got |= {i: [t for m in s for t in m.completions[0].token_ids] for i, s in streams.items()}
    assert [got[i] for i in range(12)] == expected
    calls = replica_calls(service, "tiny") - before
    assert 1 <= calls < 12, f"{calls} calls for 12 requests sent at once"
    wait_until(lambda: idle(stub))


def replica_processes(service: ServiceProcess, model: str) -> list[psutil.Process]:
    """The model's replicas (workers of the service's local Ray)."""
    return [
        p
        for p in psutil.Process(service.proc.pid).children(recursive=True)
        if " ".join(p.cmdline()).startswith(f"ray::ServeReplica:llmp-inference-{model}:")
    ]


def engine_processes(service: ServiceProcess, model: str) -> list[psutil.Process]:
    """The engine processes of the model's replicas (engine_process.ModelProcess), one a replica."""
    return [
        child
        for replica in replica_processes(service, model)
        for child in replica.children()
        if "services.inference.engine_process" in " ".join(child.cmdline())
    ]


@NEEDS_PRELOADS
def test_replicas_run_with_the_preloaded_runtime(service: ServiceProcess, stub: pb_grpc.InferenceServiceStub) -> None:
    """The replica's process (a worker of the service's local Ray) and its engine process have every library
    runtime.preloads finds mapped; the front, which runs no engine, is left as it started."""
    replicas, engines = replica_processes(service, "tiny"), engine_processes(service, "tiny")
    assert replicas, "no replica process of the model under the service"
    assert len(engines) == len(replicas), "each replica runs its engine in a child process"
    assert all(missing_preloads(p.pid) == [] for p in replicas + engines)
    assert missing_preloads(service.proc.pid) == runtime.preloads()


def test_a_replica_whose_engine_process_dies_is_replaced(
    service: ServiceProcess, stub: pb_grpc.InferenceServiceStub
) -> None:
    """A replica's engine runs in a child process. Killed mid-request, the request ends UNAVAILABLE
    instead of hanging, the replica fails its health checks, and Serve replaces it: the model answers
    again, from a new engine process."""
    stub.LoadModel(pb.LoadModelRequest(path=TINY, name="fragile", replicas=LIGHT, engine=STRETCHED), timeout=120)
    try:
        (engine,) = engine_processes(service, "fragile")
        stream = stub.GenerateStream(greedy(LONG, model="fragile"))
        assert next(stream).completions[0].token_ids
        engine.kill()
        with pytest.raises(grpc.RpcError) as ended:
            list(stream)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE, ended.value.details()

        def answers() -> bool:
            try:
                return stub.Generate(greedy(8, model="fragile"), timeout=60).usage.completion_tokens == 8
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE, e.details()
                return False

        wait_until(answers, timeout=180)
        assert [p.pid for p in engine_processes(service, "fragile")] != [engine.pid]
    finally:
        stub.UnloadModel(pb.UnloadModelRequest(model="fragile"), timeout=120)


def test_command_line(service: ServiceProcess, stub: pb_grpc.InferenceServiceStub) -> None:
    """`llmp serve` against the real service: list, generate whole and streamed, load with engine options,
    refusals naming the field."""
    from click.testing import CliRunner

    from libs.common.cli.inference import group

    env = {"LLMP_INFERENCE_ADDRESS": service.address}
    listed = CliRunner().invoke(group, ["list"], env=env)
    assert listed.exit_code == 0 and "tiny" in listed.output, listed.output
    expected = stub.Generate(pb.GenerateRequest(model="tiny", text="hello", max_tokens=6, temperature=0))
    for stream in ([], ["--stream"]):
        said = CliRunner().invoke(group, ["generate", "tiny", "hello", "--max-tokens", "6", *stream], env=env)
        assert said.exit_code == 0, said.output
        assert said.output.startswith(expected.completions[0].text) and "6 generated tokens" in said.output
    refused = CliRunner().invoke(group, ["generate", "tiny", "hello", "--temperature", "1e-9"], env=env)
    assert refused.exit_code != 0 and "temperature" in str(refused.exception)
    malformed = CliRunner().invoke(group, ["generate", "tiny", "hello", "--json-schema", "{x"], env=env)
    assert malformed.exit_code == 2 and "not JSON" in malformed.output

    # --sliding-window and --packed-only reach the replica's engine options, which GetModelInfo reports;
    # 0 leaves the window unset.
    argv = ["load", TINY, "--name", "windowed", "--sliding-window", "16", "--packed-only"]
    loaded = CliRunner().invoke(group, argv, env=env)
    assert loaded.exit_code == 0 and "sliding window 16" in loaded.output, loaded.output
    try:
        options = stub.GetModelInfo(pb.GetModelInfoRequest(model="windowed")).engine
        assert options.sliding_window == 16 and options.packed_only
        shown = CliRunner().invoke(group, ["info", "windowed"], env=env)
        assert shown.exit_code == 0 and '"slidingWindow": 16' in shown.output, shown.output
    finally:
        stub.UnloadModel(pb.UnloadModelRequest(model="windowed"))
    tiny = stub.GetModelInfo(pb.GetModelInfoRequest(model="tiny")).engine
    assert not tiny.HasField("sliding_window") and not tiny.packed_only
    negative = CliRunner().invoke(group, ["load", TINY, "--name", "w", "--sliding-window", "-3"], env=env)
    assert negative.exit_code != 0
    assert "INVALID_ARGUMENT" in str(negative.exception) and "sliding_window" in str(negative.exception)


def test_cancelling_a_stream_frees_the_cache(stub: pb_grpc.InferenceServiceStub, long: str) -> None:
    call = stub.GenerateStream(greedy(LONG, model=long))
    next(call)
    load = stub.GetModelInfo(pb.GetModelInfoRequest(model=long)).load
    assert load.requests_in_flight == 1
    call.cancel()
    wait_until(lambda: idle(stub, long))


def test_abort_by_request_id(stub: pb_grpc.InferenceServiceStub, long: str) -> None:
    call = stub.GenerateStream(greedy(LONG, model=long, request_id="abort-me"))
    next(call)
    stub.Abort(pb.AbortRequest(request_id="abort-me"))
    last = list(call)[-1]
    assert last.completions[0].finish_reason == "abort"
    wait_until(lambda: idle(stub, long))
    with pytest.raises(grpc.RpcError) as e:
        stub.Abort(pb.AbortRequest(request_id="abort-me"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_whole_reply_can_be_aborted_or_cancelled(
    service: ServiceProcess, stub: pb_grpc.InferenceServiceStub, long: str
) -> None:
    """Generate reaches the replica as one plain call (no stream): Abort still ends it with finish_reason
    "abort", and a client that gives up still frees the replica's cache. The requests ask for 100,000
    tokens, minutes of work: the replica goes idle within the wait only if the abort or the
    cancellation reached its engine."""

    def running() -> int:
        return stub.GetModelInfo(pb.GetModelInfoRequest(model=long)).load.running

    def running_one() -> bool:
        return running() == 1

    whole = stub.Generate.future(greedy(LONG, model=long, request_id="abort-whole"))
    wait_until(running_one)
    stub.Abort(pb.AbortRequest(request_id="abort-whole"))
    reply = whole.result(timeout=60)
    assert reply.completions[0].finish_reason == "abort" and reply.usage.completion_tokens < LONG
    wait_until(lambda: idle(stub, long))
    given_up = stub.Generate.future(greedy(LONG, model=long))
    wait_until(running_one)
    given_up.cancel()
    wait_until(lambda: idle(stub, long))
    assert stub.Generate(greedy(8, model=long)).usage.completion_tokens == 8

    # Sent at once, several share a call: stopping one of them stops it alone, in the engine too.
    before = replica_calls(service, long)
    ids = [f"shared-{i}" for i in range(12)]
    replies = [stub.Generate.future(greedy(LONG, model=long, request_id=rid)) for rid in ids[:6]]
    streams = [stub.GenerateStream(greedy(LONG, model=long, request_id=rid)) for rid in ids[6:]]
    wait_until(lambda: running() == 12)
    assert replica_calls(service, long) - before < 12, "some of the twelve requests share a call"
    for left, rid in reversed(list(enumerate(ids))):
        stub.Abort(pb.AbortRequest(request_id=rid))
        wait_until(lambda left=left: running() == left)
    assert all(r.result(timeout=60).completions[0].finish_reason == "abort" for r in replies)
    assert all(list(s)[-1].completions[0].finish_reason == "abort" for s in streams)
    wait_until(lambda: idle(stub, long))


def test_overload_is_refused(stub: pb_grpc.InferenceServiceStub) -> None:
    strict = pb.ReplicaOptions(num_cpus=0.5, max_ongoing_requests=1, max_queued_requests=0)
    stub.LoadModel(pb.LoadModelRequest(path=TINY, name="strict", replicas=strict, engine=STRETCHED), timeout=120)
    running = stub.GenerateStream(greedy(LONG, model="strict"))
    next(running)
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(greedy(2, model="strict"))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    running.cancel()
    wait_until(lambda: idle(stub, "strict"))
    stub.UnloadModel(pb.UnloadModelRequest(model="strict"), timeout=60)
    assert [m.name for m in stub.ListModels(pb.ListModelsRequest()).models] == ["tiny"]


@pytest.mark.parametrize(
    ("request_", "code", "field"),
    [
        (pb.GenerateRequest(model="nope", text="hi"), grpc.StatusCode.NOT_FOUND, "model"),
        (pb.GenerateRequest(model="tiny", text=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        (pb.GenerateRequest(model="tiny"), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        (pb.GenerateRequest(model="tiny", text="x" * 200), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        (pb.GenerateRequest(model="tiny", text="hi", temperature=-1), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (pb.GenerateRequest(model="tiny", text="hi", top_p=0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        (pb.GenerateRequest(model="tiny", text="hi", top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        (pb.GenerateRequest(model="tiny", text="hi", n=17), grpc.StatusCode.INVALID_ARGUMENT, "n"),
        (
            pb.GenerateRequest(model="tiny", text="hi", max_tokens=LONG + 1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_tokens",
        ),
        (pb.GenerateRequest(model="tiny", text="hi", max_tokens=127), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        (
            pb.GenerateRequest(model="tiny", text="hi", temperature=1e-30),
            grpc.StatusCode.INVALID_ARGUMENT,
            "temperature",
        ),
        (
            pb.GenerateRequest(model="tiny", text="hi", repetition_penalty=1e-40),
            grpc.StatusCode.INVALID_ARGUMENT,
            "repetition_penalty",
        ),
        (
            pb.GenerateRequest(model="tiny", text="hi", logit_bias={3: float("inf")}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "logit_bias",
        ),
        (
            pb.GenerateRequest(model="tiny", messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user")])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "messages",
        ),
        (
            pb.GenerateRequest(model="tiny", text="hi", processors=[{"type": "top_k", "k": 1}]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "processors",
        ),
        (  # a Struct may carry NaN, which has no JSON form
            pb.GenerateRequest(model="tiny", text="hi", processors=[{"type": "structured", "size": float("nan")}]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "processors[0].size",
        ),
        (
            pb.GenerateRequest(model="tiny", text="hi", processors=[{"type": "no_such_sampler"}]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "processors.type",
        ),
        (  # compiled on the replica: this model has no end-of-sequence token to finish a grammar with
            pb.GenerateRequest(model="tiny", text="hi", processors=[{"type": "structured", "regex": "[0-9]+"}]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "processors",
        ),
    ],
)
def test_bad_input_names_the_field(
    stub: pb_grpc.InferenceServiceStub, request_: pb.GenerateRequest, code: grpc.StatusCode, field: str
) -> None:
    for call in (stub.Generate, lambda r: list(stub.GenerateStream(r))):
        with pytest.raises(grpc.RpcError) as e:
            call(request_)
        assert e.value.code() == code and e.value.details().startswith(f"{field}:")
    assert idle(stub)


def test_bad_requests_beside_running_streams_leave_them_be(
    service: ServiceProcess, stub: pb_grpc.InferenceServiceStub
) -> None:
    """Values that once overflowed the sampler are refused alone; the streams on the replica finish intact."""
    engine = LLMEngine(load_model(TINY, ArtifactStore(service.home / "artifacts")))
    expected = engine.generate([PROMPT], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    streams = [stub.GenerateStream(greedy(40)) for _ in range(2)]
    firsts = [next(s) for s in streams]
    bad = [
        greedy(4),
        greedy(4, repetition_penalty=1e-40),
        greedy(4, logit_bias={7: float("nan")}),
        greedy(4, length_penalty=float("inf")),
    ]
    bad[0].temperature = 1e-30
    for request in bad:
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(request)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for first, stream in zip(firsts, streams, strict=True):
        tokens = [t for m in [first, *stream] for t in m.completions[0].token_ids]
        assert tokens == expected.outputs[0].token_ids
    wait_until(lambda: idle(stub))


def test_bad_loads_are_refused(stub: pb_grpc.InferenceServiceStub) -> None:
    cases = [
        (pb.LoadModelRequest(path="models/missing/1"), grpc.StatusCode.NOT_FOUND),
        (pb.LoadModelRequest(path="../../etc"), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.LoadModelRequest(path=TINY), grpc.StatusCode.ALREADY_EXISTS),
        (pb.LoadModelRequest(path=TINY, name="x", engine=pb.EngineOptions(dtype="int3")), grpc.StatusCode.UNAVAILABLE),
    ]
    for request, code in cases:
        with pytest.raises(grpc.RpcError) as e:
            stub.LoadModel(request, timeout=120)
        assert e.value.code() == code, e.value.details()


def test_beams_adapters_and_admission_over_grpc(service: ServiceProcess, stub: pb_grpc.InferenceServiceStub) -> None:
    base = AutoModelForCausalLM.from_pretrained(service.home / "artifacts" / TINY)
    torch.manual_seed(5)
    adapter = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter.save_pretrained(service.home / "artifacts" / "adapters" / "style" / "1")

    info = stub.LoadAdapter(pb.LoadAdapterRequest(model="tiny", name="style", path="adapters/style/1"))
    assert list(info.adapters) == ["style"]
    plain = stub.Generate(greedy(8)).completions[0].token_ids
    styled = stub.Generate(greedy(8, adapter="style")).completions[0].token_ids
    assert len(styled) == 8 and styled != plain
    beams = stub.Generate(greedy(8, beam_width=3, n=2, length_penalty=0.5, early_stopping="true"))
    assert [len(c.token_ids) for c in beams.completions] == [8, 8]
    assert beams.completions[0].token_ids != beams.completions[1].token_ids

    refused = [
        (greedy(8, adapter="nope"), grpc.StatusCode.NOT_FOUND, "adapter"),
        (greedy(8, beam_width=2, n=3), grpc.StatusCode.INVALID_ARGUMENT, "n"),
        (greedy(8, early_stopping="sometimes"), grpc.StatusCode.INVALID_ARGUMENT, "early_stopping"),
    ]
    for request, code, field in refused:
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(request)
        assert e.value.code() == code and e.value.details().startswith(f"{field}:"), e.value.details()
    assert list(stub.UnloadAdapter(pb.UnloadAdapterRequest(model="tiny", name="style")).adapters) == []

    too_big = pb.LoadModelRequest(path=TINY, name="big", replicas=pb.ReplicaOptions(memory_bytes=2**20))
    with pytest.raises(grpc.RpcError) as e:
        stub.LoadModel(too_big, timeout=120)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "GiB of weights" in e.value.details()
    assert "big" not in [m.name for m in stub.ListModels(pb.ListModelsRequest()).models]
    wait_until(lambda: idle(stub))  # replicas report their load a few times a second


def test_a_model_scaled_to_zero_starts_on_the_first_request(stub: pb_grpc.InferenceServiceStub) -> None:
    zero = pb.ReplicaOptions(min_replicas=0, max_replicas=1, num_cpus=0.5)
    info = stub.LoadModel(pb.LoadModelRequest(path=TINY, name="cold", replicas=zero), timeout=120)
    assert info.load.replicas == 0 and info.load.cold_start_seconds == 0
    request = pb.GenerateRequest(model="cold", token_ids=pb.TokenIds(ids=PROMPT), max_tokens=4, temperature=0)
    reply = stub.Generate(request, timeout=180)
    assert len(reply.completions[0].token_ids) == 4
    cold = stub.GetModelInfo(pb.GetModelInfoRequest(model="cold")).load.cold_start_seconds
    assert cold > 0
    print(f"cold start of a scaled-to-zero replica: {cold:.2f} s")
    stub.UnloadModel(pb.UnloadModelRequest(model="cold"), timeout=120)


def test_sigterm_lets_a_running_stream_finish(service: ServiceProcess, stub: pb_grpc.InferenceServiceStub) -> None:
    call = stub.GenerateStream(greedy(60))
    first = next(call)
    service.proc.send_signal(signal.SIGTERM)
    rest = list(call)
    assert sum(len(m.completions[0].token_ids) for m in [first, *rest]) == 60
    assert rest[-1].completions[0].finish_reason == "length"
    assert service.proc.wait(60) == 0
