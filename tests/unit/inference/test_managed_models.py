"""Managed models: the front's behaviour where the cluster's Serve config (KubeRay's RayService) owns
the models it declares. The core attaches to them at start, serves them, and refuses LoadModel and
UnloadModel for them with FAILED_PRECONDITION naming the model; other models load as usual.

The Ray Serve side (the builder KubeRay runs, the front attaching to its application) is tested in
tests/integration/deploy/test_serve_config.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import pytest

from libs.common.artifacts import ArtifactStore
from libs.common.errors import FailedPrecondition, InvalidArgument
from services.inference.config import InferenceConfig
from services.inference.core import InferenceCore, LocalBackend, managed_specs
from services.inference.engine import SamplingLimits
from services.inference.schema import GenerateInput, ModelSpec, ReplicaOptions, model_spec_of
from tests.unit.inference.test_service_core import TINY, greedy, reference, run, save_tiny_model

MANAGED = {
    "name": "tiny",
    "path": TINY,
    "replicas": {"max_replicas": 2, "max_ongoing_requests": 8, "max_queued_requests": 4, "num_cpus": 0.5},
    "engine": {"kv_cache_bytes": 1 << 20},
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ArtifactStore:
    store = ArtifactStore(tmp_path_factory.mktemp("artifacts"))
    save_tiny_model(store.root)
    return store


def managed_core(store: ArtifactStore, *models: Mapping[str, object]) -> InferenceCore:
    config = InferenceConfig(max_tokens=64, max_n=4, drain_seconds=5, managed_models=json.dumps(list(models)))
    return InferenceCore(config, store, LocalBackend(store, SamplingLimits(max_n=4, max_tokens=64)))


def test_a_managed_model_is_served_but_never_loaded_or_unloaded_here(store: ArtifactStore) -> None:
    prompt = (5, 17, 99, 3, 42)

    async def scenario() -> None:
        core = managed_core(store, MANAGED)
        await core.start()
        assert core.model_names() == ["tiny"]
        info = await core.model_info("tiny")
        assert info.spec == model_spec_of(MANAGED) and info.spec.replicas.max_replicas == 2
        answer = await core.generate("tiny", GenerateInput("", greedy(), token_ids=prompt))
        assert answer.completions[0].token_ids == reference(store, list(prompt), greedy())

        with pytest.raises(FailedPrecondition, match="'tiny' is deployed by the cluster's Serve config") as e:
            await core.load_model(ModelSpec("tiny", TINY))
        assert e.value.field == "name"
        with pytest.raises(FailedPrecondition, match="cannot be unloaded") as e:
            await core.unload_model("tiny")
        assert e.value.field == "model"
        assert core.model_names() == ["tiny"], "a refused call changes nothing"

        await core.load_model(ModelSpec("other", TINY, ReplicaOptions(num_cpus=0.5)))  # not managed: as usual
        await core.unload_model("other")
        assert core.model_names() == ["tiny"]
        await core.drain()

    run(scenario())


def test_a_managed_model_that_cannot_be_served_is_left_out_and_still_refused(store: ArtifactStore) -> None:
    async def scenario() -> None:
        core = managed_core(store, {"name": "gone", "path": "models/gone/1"})
        await core.start()  # the front starts (its health must go SERVING for KubeRay to go on)
        assert core.model_names() == []
        with pytest.raises(FailedPrecondition, match="'gone'"):
            await core.load_model(ModelSpec("gone", TINY))
        await core.drain()

    run(scenario())


FIRST = "inference.managed_models[0]"


@pytest.mark.parametrize(
    ("setting", "field"),
    [
        ("{not json", "inference.managed_models"),
        ('{"name": "tiny"}', "inference.managed_models"),
        ('[{"name": "tiny"}]', f"{FIRST}.path"),
        ('[{"name": "a", "path": "p", "replicas": {"max_replica": 2}}]', f"{FIRST}.replicas.max_replica"),
        ('[{"name": "a", "path": "p", "engine": {"kv_cache_bytes": "1"}}]', f"{FIRST}.engine.kv_cache_bytes"),
        ('[{"name": "a", "path": "p", "replicas": {"num_gpus": true}}]', f"{FIRST}.replicas.num_gpus"),
        ('[{"name": "a", "path": "p"}, {"name": "a", "path": "q"}]', "inference.managed_models"),
    ],
)
def test_a_bad_managed_models_setting_names_the_field(setting: str, field: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        managed_specs(setting)
    assert e.value.field == field


def test_model_spec_of_reads_every_option() -> None:
    spec = model_spec_of(
        {
            "name": "m",
            "path": "models/m/3",
            "replicas": {"min_replicas": 0, "target_ongoing_requests": 3, "num_gpus": 1},
            "engine": {"quantization": "int8", "speculative": '{"type": "ngram"}', "compile": True},
        }
    )
    assert spec.replicas.min_replicas == 0 and spec.replicas.target_ongoing_requests == 3.0
    assert isinstance(spec.replicas.num_gpus, float) and spec.engine.compile is True
    assert spec.engine.speculative == '{"type": "ngram"}' and spec.engine.dtype == "float32"
