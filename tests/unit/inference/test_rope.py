"""RoPE scaling at load time: the same logits as transformers' own scaled model, and the longer context enforced."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from libs.common.artifacts import ArtifactStore
from libs.common.errors import InvalidArgument
from services.inference.engine import (
    EngineConfig,
    KVCacheConfig,
    LLMEngine,
    SamplingParams,
    SchedulerConfig,
    load_model,
)
from services.inference.engine.batch import StepChunk
from tests.helpers.tiny_models import NO_SPECIAL, SMALL, prompt

torch.set_num_threads(1)

TRAINED = 32  # the tiny model's max_position_embeddings, so that 100 tokens run past it
SPECS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 16.0},
}


def short_config(**rope_parameters) -> LlamaConfig:
    rope = {"rope_parameters": {"rope_theta": 10000.0, **rope_parameters}} if rope_parameters else {}
    return LlamaConfig(**SMALL, num_key_value_heads=2, max_position_embeddings=TRAINED, **NO_SPECIAL, **rope)


@pytest.fixture(scope="module")
def short_store(tmp_path_factory: pytest.TempPathFactory) -> ArtifactStore:
    store = ArtifactStore(tmp_path_factory.mktemp("rope"))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(short_config()).save_pretrained(store.root / "models/short/1")
    return store


def engine(model) -> LLMEngine:
    config = EngineConfig(KVCacheConfig(block_size=4, num_blocks=64), SchedulerConfig(max_num_batched_tokens=256))
    return LLMEngine(model, config)


def engine_logits(e: LLMEngine, tokens: list[int]) -> torch.Tensor:
    """Logits of every position from one packed step over the paged cache: [len(tokens), vocab]."""
    e.cache.allocate("s", len(tokens))
    return e.runner.forward([StepChunk("s", tokens, 0, True, num_logits=len(tokens))])


@pytest.mark.parametrize("rope_type", list(SPECS))
def test_logits_equal_transformers_built_with_the_same_scaling(short_store: ArtifactStore, rope_type: str) -> None:
    spec = SPECS[rope_type]
    directory = short_store.root / "models/short/1"
    config = short_config(**spec)
    reference = AutoModelForCausalLM.from_pretrained(directory, config=config, attn_implementation="sdpa").eval()
    tokens = prompt(100, seed=1)
    with torch.no_grad():
        expected = reference(torch.tensor([tokens])).logits[0]  # [100, vocab]
    scaled = engine(load_model("models/short/1", short_store, rope_scaling=spec))
    plain = engine(load_model("models/short/1", short_store))
    assert scaled.max_model_len == 4 * TRAINED
    torch.testing.assert_close(engine_logits(scaled, tokens), expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(engine_logits(plain, tokens), expected, atol=1e-3)  # the scaling took effect


def test_context_limit_grows_with_the_factor_and_is_enforced(short_store: ArtifactStore) -> None:
    plain = engine(load_model("models/short/1", short_store))
    scaled = engine(load_model("models/short/1", short_store, rope_scaling=SPECS["linear"]))
    with pytest.raises(InvalidArgument, match="context of 32") as info:
        plain.add_request(prompt(40, seed=2), SamplingParams(max_tokens=4))
    assert info.value.field == "prompt"
    [out] = scaled.generate([prompt(100, seed=2)], SamplingParams(max_tokens=28, temperature=0))
    assert len(out.outputs[0].token_ids) == 28
    with pytest.raises(InvalidArgument, match="exceed the context of 128") as info:
        scaled.add_request(prompt(100, seed=2), SamplingParams(max_tokens=29))
    assert info.value.field == "max_tokens"


def test_models_without_rope_refuse_it(store: ArtifactStore) -> None:
    with pytest.raises(InvalidArgument, match="no rotary") as info:
        load_model("models/gpt2/1", store, rope_scaling=SPECS["linear"])
    assert info.value.field == "rope_scaling"


@pytest.mark.parametrize(
    "spec",
    [
        {"rope_type": "ntk-by-parts", "factor": 2.0},
        {"rope_type": "linear", "factor": 0.5},
        {"rope_type": "linear", "factor": "2"},
        {"rope_type": "yarn"},
        "linear",
    ],
)
def test_bad_specs_are_refused(short_store: ArtifactStore, spec) -> None:
    with pytest.raises(InvalidArgument) as info:
        load_model("models/short/1", short_store, rope_scaling=spec)
    assert info.value.field == "rope_scaling"
