"""The inference core without Ray: models served in-process, checked against the engine itself."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable

import pytest

from libs.common.artifacts import ArtifactStore
from libs.common.errors import InvalidArgument, LlmpError, NotFound, ResourceExhausted
from services.inference.core import InferenceCore
from services.inference.engine import SamplingLimits, SamplingParams
from services.inference.model_server import ModelServer
from services.inference.schema import Chunk, EngineOptions, GenerateInput, ModelSpec, ReplicaOptions
from services.inference.text import TextDeltas
from tests.helpers.inference_core import greedy, make_core, reference, run
from tests.helpers.tiny_models import TINY, save_tiny_model


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ArtifactStore:
    store = ArtifactStore(tmp_path_factory.mktemp("artifacts"))
    save_tiny_model(store.root)
    return store


async def collect(chunks: AsyncIterator[Chunk]) -> list[Chunk]:
    return [c async for c in chunks]


def test_unary_and_streamed_generation_equal_the_engine(store: ArtifactStore) -> None:
    prompt = [5, 17, 99, 3, 42]
    expected = reference(store, prompt, greedy())

    async def scenario() -> tuple[Chunk, list[Chunk], Chunk]:
        core = make_core(store)
        info = await core.load_model(ModelSpec("tiny", TINY))
        assert (info.facts.model_type, info.context_length, info.facts.has_tokenizer) == ("llama", 128, True)
        unary = await core.generate("tiny", GenerateInput("", greedy(), token_ids=tuple(prompt)))
        streamed = await collect(core.stream("tiny", GenerateInput("", greedy(), token_ids=tuple(prompt))))
        text = await core.generate("tiny", GenerateInput("", greedy(), text="hello"))
        return unary, streamed, text

    unary, streamed, text = run(scenario())
    assert unary.completions[0].token_ids == expected
    assert [t for c in streamed for t in c.completions[0].token_ids] == expected
    assert "".join(c.completions[0].text for c in streamed) == unary.completions[0].text
    assert streamed[-1].finished and streamed[-1].completion_tokens == len(expected)
    assert text.prompt_tokens == 5 and text.completions[0].finish_reason == "length"


def test_a_bounded_message_rate_merges_tokens_into_fewer_chunks(store: ArtifactStore) -> None:
    """Each stream may send one chunk per 1000 s here: the first token, then the rest in the last chunk."""
    prompt = [5, 17, 99, 3, 42]
    params = dataclasses.replace(greedy(), n=2, logprobs=1)

    async def scenario() -> tuple[list[Chunk], list[Chunk]]:
        streams = []
        for rate in (0.0, 1e-3):
            server = ModelServer(ModelSpec("tiny", TINY), store, SamplingLimits(), messages_per_second=rate)
            streams.append(await collect(server.generate(GenerateInput("r", params, token_ids=tuple(prompt)))))
        return streams[0], streams[1]

    every_step, merged = run(scenario())
    # one chunk a step (12) while the reader keeps up; a reader that falls behind gets steps merged
    assert 2 < len(every_step) <= 12 and len(merged) == 2
    # the first chunk goes at once: its first token, and any step the engine made before the reader took it
    assert all(1 <= len(c.token_ids) < 12 for c in merged[0].completions)
    assert merged[-1].finished and not merged[0].finished
    for i in range(2):
        for field in ("token_ids", "logprobs"):
            whole = [x for c in every_step for x in getattr(c.completions[i], field)]
            assert [x for c in merged for x in getattr(c.completions[i], field)] == whole
        assert "".join(c.completions[i].text for c in merged) == "".join(c.completions[i].text for c in every_step)
    assert merged[-1].completion_tokens == every_step[-1].completion_tokens == 24


def test_abort_and_a_closed_stream_free_the_cache(store: ArtifactStore) -> None:
    async def scenario() -> tuple[Chunk, float, float]:
        core = make_core(store)
        await core.load_model(ModelSpec("tiny", TINY))
        stream = core.stream("tiny", GenerateInput("r1", greedy(60), token_ids=(1, 2, 3)))
        first = await anext(stream)
        assert first.completions[0].token_ids and (await core.model_info("tiny")).load.kv_cache_usage > 0
        core.abort("r1")
        last = (await collect(stream))[-1]
        usage_after_abort = await settled_usage(core)
        closed = core.stream("tiny", GenerateInput("r2", greedy(60), token_ids=(1, 2, 3)))
        await anext(closed)
        await closed.aclose()  # the caller hung up
        return last, usage_after_abort, await settled_usage(core)

    last, after_abort, after_close = run(scenario())
    assert last.finished and last.completions[0].finish_reason == "abort"
    assert after_abort == 0 and after_close == 0


async def settled_usage(core: InferenceCore) -> float:
    """KV-cache usage once the engine has run the step that frees aborted requests."""
    served = core._served("tiny")
    engine = served.handle.server.engine  # type: ignore[attr-defined]
    await wait_for(lambda: not engine.has_unfinished())
    return (await core.model_info("tiny")).load.kv_cache_usage


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


@pytest.mark.parametrize(
    ("model", "change", "field"),
    [
        ("nope", {}, "model"),
        ("tiny", {"token_ids": None}, "prompt"),
        ("tiny", {"token_ids": None, "text": ""}, "prompt"),
        ("tiny", {"token_ids": (1, 999)}, "token_ids"),
        ("tiny", {"params": SamplingParams(temperature=-1)}, "temperature"),
        ("tiny", {"params": SamplingParams(top_p=0)}, "top_p"),
        ("tiny", {"params": SamplingParams(top_p=1.5)}, "top_p"),
        ("tiny", {"params": SamplingParams(n=5)}, "n"),
        ("tiny", {"params": SamplingParams(max_tokens=65)}, "max_tokens"),
        ("tiny", {"token_ids": tuple(range(128))}, "prompt"),
    ],
)
def test_bad_requests_name_the_field(store: ArtifactStore, model: str, change: dict, field: str) -> None:
    request = dataclasses.replace(GenerateInput("", SamplingParams(), token_ids=(1, 2)), **change)

    async def scenario() -> LlmpError:
        core = make_core(store)
        await core.load_model(ModelSpec("tiny", TINY))
        with pytest.raises(LlmpError) as e:
            await core.generate(model, request)
        assert core._served("tiny").in_flight == 0
        return e.value

    error = run(scenario())
    assert error.field == field
    assert isinstance(error, NotFound if field == "model" else InvalidArgument)


def test_load_refuses_bad_models_and_options(store: ArtifactStore) -> None:
    async def scenario() -> list[str | None]:
        core = make_core(store)
        fields = []
        for spec in [
            ModelSpec("missing", "models/missing/1"),
            ModelSpec("escape", "../outside"),
            ModelSpec("bad name!", TINY),
            ModelSpec("tiny", TINY, ReplicaOptions(min_replicas=2, max_replicas=1)),
        ]:
            with pytest.raises(LlmpError) as e:
                await core.load_model(spec)
            fields.append(e.value.field)
        assert core.model_names() == []
        return fields

    assert run(scenario()) == ["path", "path", "name", "replicas.max_replicas"]


def test_overload_is_refused_not_queued(store: ArtifactStore) -> None:
    async def scenario() -> None:
        core = make_core(store)
        await core.load_model(ModelSpec("tiny", TINY, ReplicaOptions(max_ongoing_requests=1, max_queued_requests=0)))
        running = core.stream("tiny", GenerateInput("long", greedy(60), token_ids=(1, 2)))
        await anext(running)
        with pytest.raises(ResourceExhausted):
            await core.generate("tiny", GenerateInput("", greedy(), token_ids=(1, 2)))
        await running.aclose()
        assert (await core.generate("tiny", GenerateInput("", greedy(2), token_ids=(1, 2)))).finished

    run(scenario())


def test_drain_waits_for_running_requests(store: ArtifactStore) -> None:
    async def scenario() -> Chunk:
        core = make_core(store)
        await core.load_model(ModelSpec("tiny", TINY))
        request = asyncio.ensure_future(core.generate("tiny", GenerateInput("", greedy(30), token_ids=(1, 2))))
        await wait_for(lambda: core._served("tiny").in_flight == 1)
        await core.drain()
        assert request.done()
        return request.result()

    assert run(scenario()).completions[0].finish_reason == "length"


def test_text_deltas_never_take_text_back() -> None:
    deltas = TextDeltas(stop=["END"])
    assert deltas.take("ab", finished=False) == ""  # could be the start of "END"
    assert deltas.take("abcd", finished=False) == "ab"
    assert deltas.take("abcdef\ufffd", finished=False) == "cd"  # U+FFFD: bytes of a character still to come
    assert deltas.take("abcdefé", finished=True) == "efé"
    assert TextDeltas().take(None, finished=True) == ""


def test_serve_backpressure_becomes_resource_exhausted() -> None:
    from ray.serve.exceptions import BackPressureError

    from services.inference.serve_app import domain_error

    assert isinstance(domain_error(BackPressureError(num_queued_requests=1, max_queued_requests=1)), ResourceExhausted)
    error = InvalidArgument("must be >= 0", field="temperature")
    assert domain_error(error) is error


def test_speculative_and_quantised_replicas_through_the_service(store: ArtifactStore) -> None:
    prompt = [5, 17, 99, 3, 42, 5, 17, 99, 3, 42, 5, 17]  # repetitive: the n-gram drafter finds matches
    expected = reference(store, prompt, greedy(24))

    async def scenario() -> tuple[Chunk, Chunk, float, float]:
        core = make_core(store)
        engine = EngineOptions(speculative='{"type": "ngram", "num_tokens": 4}')
        await core.load_model(ModelSpec("spec", TINY, engine=engine))
        speculative = await core.generate("spec", GenerateInput("", greedy(24), token_ids=tuple(prompt)))
        await core.load_model(ModelSpec("int8", TINY, engine=EngineOptions(quantization="int8")))
        quantised = await core.generate("int8", GenerateInput("", greedy(24), token_ids=tuple(prompt)))
        full = (await core.model_info("spec")).load.bytes_per_parameter
        int8 = (await core.model_info("int8")).load.bytes_per_parameter
        return speculative, quantised, full, int8

    speculative, quantised, full, int8 = run(scenario())
    completion = speculative.completions[0]
    assert completion.token_ids == expected, "speculative decoding at temperature 0 changes nothing"
    assert completion.draft_tokens > 0 and 0 <= completion.accepted_draft_tokens <= completion.draft_tokens
    assert len(quantised.completions[0].token_ids) == 24
    assert full == 4.0 and int8 < 2.0, "fp32 is 4 bytes per parameter; int8 layers cut it (embeddings stay fp32)"


def test_bad_plugin_specs_name_the_field(store: ArtifactStore) -> None:
    async def scenario(engine: EngineOptions) -> None:
        await make_core(store).load_model(ModelSpec("bad", TINY, engine=engine))

    with pytest.raises(InvalidArgument, match="quantization"):
        run(scenario(EngineOptions(quantization="int3")))
    with pytest.raises(InvalidArgument, match=r"engine\.speculative"):
        run(scenario(EngineOptions(speculative="{not json")))
