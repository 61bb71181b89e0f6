"""Structured output (the "structured" sampler stage, llguidance): at temperature 1 from a random
model, every completion parses and validates; bad grammars are refused naming the field."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig

from libs.common.artifacts import ArtifactStore
from libs.common.errors import InvalidArgument
from services.inference.core import InferenceCore
from services.inference.engine import LLMEngine, SamplingParams, load_model
from services.inference.schema import Chunk, EngineOptions, GenerateInput, ModelSpec
from tests.helpers.inference_core import make_core, run

MODEL = "models/eos-tiny/1"
EOS = 256
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "pet": {"enum": ["cat", "dog"]},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}


def save_model_with_eos(root: Path) -> None:
    """A 2-layer Llama over bytes plus an "<eos>" special token (id 256), which structured output needs."""
    folder = root / MODEL
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=260,
        max_position_embeddings=256,
        bos_token_id=None,
        eos_token_id=EOS,
        pad_token_id=None,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, safe_serialization=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken("<eos>", special=True)])
    tokenizer.save(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ArtifactStore:
    store = ArtifactStore(tmp_path_factory.mktemp("artifacts"))
    save_model_with_eos(store.root)
    return store


@pytest.fixture(scope="module")
def core(store: ArtifactStore) -> InferenceCore:
    core = make_core(store)
    run(core.load_model(ModelSpec("m", MODEL)))
    return core


def sample(core: InferenceCore, spec: dict, n: int = 4, seed: int = 0, max_tokens: int = 64) -> Chunk:
    params = SamplingParams(max_tokens=max_tokens, temperature=1.0, n=n, seed=seed, processors=(spec,))
    return run(core.generate("m", GenerateInput("", params, text="Answer: ")))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_sample_follows_the_json_schema(core: InferenceCore, seed: int) -> None:
    chunk = sample(core, {"type": "structured", "json_schema": SCHEMA}, seed=seed)
    for completion in chunk.completions:
        assert completion.finish_reason == "stop", completion.text
        jsonschema.validate(json.loads(completion.text), SCHEMA)


def test_json_object_regex_and_choice(core: InferenceCore) -> None:
    for completion in sample(core, {"type": "structured", "json_object": True}).completions:
        assert completion.text.startswith("{")
        if completion.finish_reason == "stop":  # a random model may write an object longer than max_tokens
            assert isinstance(json.loads(completion.text), dict)
    for completion in sample(core, {"type": "structured", "regex": "[0-9]{3}-[a-z]{2}"}).completions:
        assert re.fullmatch("[0-9]{3}-[a-z]{2}", completion.text) and completion.finish_reason == "stop"
    choices = ["yes", "no", "maybe"]
    for completion in sample(core, {"type": "structured", "choice": choices}, n=4).completions:
        assert completion.text in choices


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "structured", "regex": "(["},
        {"type": "structured", "json_schema": {"type": "objectx"}},
        {"type": "structured", "choice": []},
        {"type": "structured", "regex": "a", "choice": ["a"]},
        {"type": "structured", "json_schema": SCHEMA, "tokenizer": "mine"},
    ],
)
def test_uncompilable_grammars_name_the_field(core: InferenceCore, spec: dict) -> None:
    with pytest.raises(InvalidArgument) as e:
        sample(core, spec)
    assert e.value.field == "processors"
    assert core._served("m").in_flight == 0


def test_batched_masks_give_what_each_request_gets_alone(store: ArtifactStore) -> None:
    """Masks computed for the batch at once (one prepare_batch call a step) equal masks computed alone."""
    model = load_model(MODEL, store)
    tokenizer = Tokenizer.from_file(str(store.root / MODEL / "tokenizer.json"))
    spec = {"type": "structured", "json_schema": SCHEMA}
    params = [SamplingParams(max_tokens=48, temperature=1.0, seed=s, processors=(spec,)) for s in range(4)]
    prompt = tokenizer.encode("Answer: ").ids

    def engine() -> LLMEngine:
        return LLMEngine(model, tokenizer=tokenizer)

    alone = [engine().generate([prompt], p)[0].outputs[0].token_ids for p in params]
    together = engine()
    ids = [together.add_request(prompt, p) for p in params]
    last = {}
    while together.has_unfinished():
        for out in together.step():
            last[out.request_id] = out.outputs[0].token_ids
    assert [last[i] for i in ids] == alone
    assert not together._batched


def test_structured_output_under_speculative_decoding(store: ArtifactStore) -> None:
    """Drafts the grammar refuses are rejected, and the matcher rolls back to the accepted tokens."""
    core = make_core(store)
    engine = EngineOptions(speculative='{"type": "ngram", "num_tokens": 4}')
    run(core.load_model(ModelSpec("m", MODEL, engine=engine)))
    for seed in (0, 1):
        for completion in sample(core, {"type": "structured", "json_schema": SCHEMA}, seed=seed).completions:
            assert completion.finish_reason == "stop", completion.text
            jsonschema.validate(json.loads(completion.text), SCHEMA)
