"""The inference core against hostile input: sampling values of every kind (a property test), the
operator's caps on LoadModel, concurrent loads of one name and a deploy that never ends."""

from __future__ import annotations

import asyncio
import dataclasses
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libs.common.artifacts import ArtifactStore
from libs.common.errors import AlreadyExists, InvalidArgument, LlmpError, Unavailable
from services.inference.config import InferenceConfig
from services.inference.core import InferenceCore, LocalBackend, ModelHandle
from services.inference.engine import SamplingLimits, SamplingParams
from services.inference.schema import EngineOptions, GenerateInput, ModelSpec, ReplicaOptions
from tests.helpers.inference_core import make_core, run
from tests.helpers.tiny_models import TINY, save_tiny_model

VOCAB = 256
SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ArtifactStore:
    store = ArtifactStore(tmp_path_factory.mktemp("artifacts"))
    save_tiny_model(store.root)
    return store


@pytest.fixture(scope="module")
def core(store: ArtifactStore) -> InferenceCore:
    core = make_core(store)
    run(core.load_model(ModelSpec("tiny", TINY)))
    return core


# Values inside every range, edges included: temperature 0.01 over a bias of 100 and a penalty of
# 0.01 is the steepest distribution allowed, and must still sample.
valid = {
    "max_tokens": st.integers(1, 8),
    "temperature": st.one_of(st.just(0.0), st.floats(0.01, 100), st.sampled_from([0.01, 100.0])),
    "top_k": st.integers(0, 300),
    "top_p": st.one_of(st.floats(1e-6, 1), st.sampled_from([1e-6, 1.0])),
    "min_p": st.one_of(st.floats(0, 1), st.sampled_from([0.0, 1.0])),
    "repetition_penalty": st.one_of(st.floats(0.01, 100), st.sampled_from([0.01, 100.0])),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "logit_bias": st.dictionaries(st.integers(0, VOCAB - 1), st.floats(-100, 100), max_size=4),
    "seed": st.one_of(st.none(), st.integers(0, 2**62)),
    "n": st.integers(1, 4),
    "stop_token_ids": st.lists(st.integers(0, VOCAB - 1), max_size=3).map(tuple),
    "logprobs": st.one_of(st.none(), st.integers(0, 20)),
    "ignore_eos": st.booleans(),
}
# What a client can send besides: the edges' other side and what breaks arithmetic.
hostile_float = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([-0.0, 1e-45, 1e-30, 1e-3, 101.0, 1e30, math.inf, -math.inf, math.nan]),
)
hostile = {
    **{name: hostile_float for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty")},
    "frequency_penalty": hostile_float,
    "length_penalty": hostile_float,
    "max_tokens": st.integers(-1, 100),
    "top_k": st.integers(-2, -1),
    "logit_bias": st.dictionaries(st.integers(-1, VOCAB + 1), hostile_float, min_size=1, max_size=4),
    "seed": st.integers(-(2**64), 2**64),
    "n": st.integers(-1, 6),
    "stop_token_ids": st.lists(st.integers(-1, VOCAB + 1), min_size=1, max_size=3).map(tuple),
    "logprobs": st.integers(-1, 25),
    "beam_width": st.integers(0, 20),
}


@st.composite
def sampling(draw: st.DrawFn, spoiled: int) -> SamplingParams:
    """Valid values, with up to `spoiled` fields drawn from the hostile ones."""
    fields = {name: draw(strategy) for name, strategy in valid.items()}
    for name in draw(st.lists(st.sampled_from(sorted(hostile)), max_size=spoiled, unique=True)):
        fields[name] = draw(hostile[name])
    return SamplingParams(**fields)


def generate(core: InferenceCore, params: SamplingParams) -> None:
    """A valid completion, or INVALID_ARGUMENT naming a sampling field; anything else fails the test."""
    try:
        chunk = run(core.generate("tiny", GenerateInput("", params, token_ids=(1, 2, 3))))
    except InvalidArgument as e:
        assert e.field in SAMPLING_FIELDS
        return
    assert chunk.finished and len(chunk.completions) == params.n
    for completion in chunk.completions:
        assert completion.finish_reason in ("stop", "length")
        assert 1 <= len(completion.token_ids) <= params.max_tokens
        assert all(0 <= t < VOCAB for t in completion.token_ids)
        assert all(not math.isnan(lp.logprob) for lp in completion.logprobs)


SETTINGS = settings(
    max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@SETTINGS
@given(params=sampling(spoiled=0))
def test_every_value_inside_the_ranges_samples(core: InferenceCore, params: SamplingParams) -> None:
    validated = True
    try:
        params.validate(VOCAB, core.limits)
    except InvalidArgument:
        validated = False
    assert validated
    generate(core, params)


@SETTINGS
@given(params=sampling(spoiled=2))
def test_any_sampling_values_give_a_completion_or_name_the_field(core: InferenceCore, params: SamplingParams) -> None:
    """Never an internal error: INVALID_ARGUMENT naming a sampling field, or valid completions."""
    generate(core, params)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (SamplingParams(temperature=1e-30), "temperature"),
        (SamplingParams(temperature=math.nan), "temperature"),
        (SamplingParams(repetition_penalty=1e-40), "repetition_penalty"),
        (SamplingParams(logit_bias={3: math.inf}), "logit_bias"),
        (SamplingParams(logit_bias={3: 1e9}), "logit_bias"),
        (SamplingParams(presence_penalty=math.nan), "presence_penalty"),
        (SamplingParams(length_penalty=math.inf), "length_penalty"),
        (SamplingParams(processors=({"type": "temperature", "temperature": 1e-30},)), "processors"),
    ],
)
def test_values_that_used_to_overflow_are_refused(params: SamplingParams, field: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        params.validate(VOCAB, SamplingLimits())
    assert e.value.field == field


CAPS = InferenceConfig(
    max_tokens=64,
    max_n=4,
    max_replicas=2,
    max_replica_cpus=2,
    max_replica_gpus=1,
    max_replica_memory_bytes=1 << 30,
    max_ongoing_requests=64,
    max_kv_cache_bytes=1 << 30,
    max_num_seqs=64,
    max_num_batched_tokens=512,
    max_draft_tokens=4,
)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (ModelSpec("m", TINY, ReplicaOptions(max_replicas=3)), "replicas.max_replicas"),
        (ModelSpec("m", TINY, ReplicaOptions(num_cpus=4)), "replicas.num_cpus"),
        (ModelSpec("m", TINY, ReplicaOptions(num_cpus=math.nan)), "replicas.num_cpus"),
        (ModelSpec("m", TINY, ReplicaOptions(num_gpus=2)), "replicas.num_gpus"),
        (ModelSpec("m", TINY, ReplicaOptions(memory_bytes=2 << 30)), "replicas.memory_bytes"),
        (ModelSpec("m", TINY, ReplicaOptions(max_ongoing_requests=65)), "replicas.max_ongoing_requests"),
        (ModelSpec("m", TINY, ReplicaOptions(max_queued_requests=65)), "replicas.max_queued_requests"),
        (ModelSpec("m", TINY, ReplicaOptions(target_ongoing_requests=math.inf)), "replicas.target_ongoing_requests"),
        (ModelSpec("m", TINY, engine=EngineOptions(kv_cache_bytes=2 << 30)), "engine.kv_cache_bytes"),
        (ModelSpec("m", TINY, engine=EngineOptions(max_num_seqs=65)), "engine.max_num_seqs"),
        (ModelSpec("m", TINY, engine=EngineOptions(max_num_batched_tokens=513)), "engine.max_num_batched_tokens"),
        (
            ModelSpec("m", TINY, engine=EngineOptions(speculative='{"type": "ngram", "num_tokens": 5}')),
            "engine.speculative.num_tokens",
        ),
        (
            ModelSpec("m", TINY, engine=EngineOptions(speculative='{"type": "ngram", "max_ngram": 1000}')),
            "engine.speculative.max_ngram",
        ),
        (
            ModelSpec(
                "m",
                TINY,
                engine=EngineOptions(
                    speculative='{"type": "draft_model", "model": "models/tiny/1", "kv_cache": {"num_blocks": 1e9}}'
                ),
            ),
            "engine.speculative.kv_cache",
        ),
    ],
)
def test_load_options_beyond_the_operators_caps_name_the_field(
    store: ArtifactStore, spec: ModelSpec, field: str
) -> None:
    core = InferenceCore(CAPS, store, LocalBackend(store, SamplingLimits(max_n=4, max_tokens=64)))
    with pytest.raises(InvalidArgument) as e:
        run(core.load_model(spec))
    assert e.value.field == field
    assert core.model_names() == [] and not core._models


def test_within_the_caps_a_model_loads(store: ArtifactStore) -> None:
    core = InferenceCore(CAPS, store, LocalBackend(store, SamplingLimits(max_n=4, max_tokens=64)))
    spec = ModelSpec("m", TINY, ReplicaOptions(max_replicas=2, num_cpus=2), EngineOptions(kv_cache_bytes=1 << 20))
    assert run(core.load_model(spec)).spec == spec


def test_two_concurrent_loads_of_one_name_deploy_once(store: ArtifactStore) -> None:
    deployed: list[str] = []

    class CountingBackend(LocalBackend):
        async def deploy(self, spec: ModelSpec) -> ModelHandle:
            deployed.append(spec.name)
            return await super().deploy(spec)

    async def scenario() -> list[object]:
        core = InferenceCore(make_core(store).config, store, CountingBackend(store, SamplingLimits()))
        spec = ModelSpec("tiny", TINY)
        return await asyncio.gather(core.load_model(spec), core.load_model(spec), return_exceptions=True)

    results = run(scenario())
    assert deployed == ["tiny"]
    assert sum(isinstance(r, AlreadyExists) for r in results) == 1
    assert sum(not isinstance(r, LlmpError) for r in results) == 1


def test_a_deploy_past_its_timeout_is_removed_and_the_name_freed(store: ArtifactStore) -> None:
    removed: list[str] = []

    class StuckBackend(LocalBackend):
        async def deploy(self, spec: ModelSpec) -> ModelHandle:
            await asyncio.Event().wait()  # a deployment whose replicas never come up
            raise AssertionError

        async def remove(self, name: str) -> None:
            removed.append(name)

    async def scenario() -> None:
        config = dataclasses.replace(make_core(store).config, deploy_timeout_seconds=0.05)
        core = InferenceCore(config, store, StuckBackend(store, SamplingLimits()))
        with pytest.raises(Unavailable, match="did not deploy"):
            await core.load_model(ModelSpec("tiny", TINY))
        assert core.model_names() == [] and not core._models

    run(scenario())
    assert removed == ["tiny"]

