"""LoRA adapters per request: greedy output equal to peft's merged model, in mixed batches, loaded at run time."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from libs.common.artifacts import ArtifactStore
from libs.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.inference.engine import EngineConfig, KVCacheConfig, LLMEngine, SamplingParams, load_model
from tests.helpers.tiny_models import prompt

torch.set_num_threads(1)

TARGETS = {"attn": ["q_proj", "v_proj"], "mlp": ["gate_proj", "down_proj", "o_proj"]}
PROMPTS = [prompt(18, seed=1), prompt(7, seed=2), prompt(11, seed=3)]


def greedy(adapter: str | None = None) -> SamplingParams:
    return SamplingParams(max_tokens=8, temperature=0, adapter=adapter)


def expected_tokens(model: torch.nn.Module) -> list[list[int]]:
    with torch.no_grad():
        return [
            model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False)[0, len(p) :].tolist() for p in PROMPTS
        ]


@pytest.fixture(scope="module")
def merged_outputs(store: ArtifactStore) -> dict[str | None, list[list[int]]]:
    """Save one peft adapter per entry of TARGETS; the greedy outputs of each merged model (None: base)."""
    outputs = {}
    for seed, (name, targets) in enumerate(TARGETS.items()):
        base = AutoModelForCausalLM.from_pretrained(store.root / "models/llama/1")
        torch.manual_seed(seed)
        config = LoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False)
        lora = get_peft_model(base, config)
        lora.save_pretrained(store.root / f"adapters/{name}/1")
        outputs[name] = expected_tokens(lora.merge_and_unload().eval())
    outputs[None] = expected_tokens(AutoModelForCausalLM.from_pretrained(store.root / "models/llama/1").eval())
    return outputs


def engine(store: ArtifactStore, pack: bool = False) -> LLMEngine:
    model = load_model("models/llama/1", store)  # its own copy: adapters hook into the model's layers
    config = EngineConfig(KVCacheConfig(block_size=4, num_blocks=128), pack_weights=pack)
    return LLMEngine(model, config, store=store)


def run(e: LLMEngine) -> dict[str, list[int]]:
    tokens = {}
    while e.has_unfinished():
        tokens.update({o.request_id: o.outputs[0].token_ids for o in e.step() if o.finished})
    return tokens


@pytest.mark.parametrize("pack", [False, True], ids=["plain", "packed-weights"])
def test_mixed_batch_equals_each_merged_model(store: ArtifactStore, merged_outputs, pack: bool) -> None:
    """Packed weights (the service's engines) are packed before the adapters load: the hooked layers
    get their plain weights back."""
    assert merged_outputs["attn"] != merged_outputs[None] != merged_outputs["mlp"]  # the adapters matter
    e = engine(store, pack)
    if pack:
        base = [e.add_request(p, greedy()) for p in PROMPTS]
        tokens = run(e)
        assert [tokens[rid] for rid in base] == merged_outputs[None], "packed, before any adapter"
    for name in TARGETS:
        e.load_adapter(name, f"adapters/{name}/1")
    names = [None, "attn", "mlp"]
    jobs = {e.add_request(p, greedy(name)): (name, i) for name in names for i, p in enumerate(PROMPTS)}
    tokens = run(e)
    for rid, (name, i) in jobs.items():
        assert tokens[rid] == merged_outputs[name][i], (name, i)
    assert e.cache.pool.num_used == 0


def test_prefix_cache_is_not_shared_between_adapters(store: ArtifactStore, merged_outputs) -> None:
    e = engine(store)
    [base] = e.generate([PROMPTS[0]], greedy())
    e.load_adapter("attn", store.root / "adapters/attn/1")  # an absolute path inside the store
    [tuned] = e.generate([PROMPTS[0]], greedy("attn"))
    [again] = e.generate([PROMPTS[0]], greedy("attn"))
    assert tuned.num_cached_tokens == 0 and again.num_cached_tokens == 16
    assert [base.outputs[0].token_ids, tuned.outputs[0].token_ids, again.outputs[0].token_ids] == [
        merged_outputs[None][0],
        merged_outputs["attn"][0],
        merged_outputs["attn"][0],
    ]


def test_adapters_load_and_unload_while_requests_run(store: ArtifactStore, merged_outputs) -> None:
    e = engine(store)
    first = e.add_request(PROMPTS[1], greedy())
    e.step()
    e.load_adapter("mlp", "adapters/mlp/1")
    second = e.add_request(PROMPTS[2], greedy("mlp"))
    e.step()
    with pytest.raises(FailedPrecondition, match="in use"):
        e.unload_adapter("mlp")
    tokens = run(e)
    assert [tokens[first], tokens[second]] == [merged_outputs[None][1], merged_outputs["mlp"][2]]
    e.unload_adapter("mlp")
    with pytest.raises(NotFound) as info:
        e.add_request(PROMPTS[0], greedy("mlp"))
    assert info.value.field == "adapter" and not e.has_unfinished()


def test_bad_adapters_are_refused(store: ArtifactStore, tmp_path) -> None:
    e = engine(store)
    with pytest.raises(NotFound) as info:
        e.add_request(PROMPTS[0], greedy("missing"))
    assert info.value.field == "adapter"
    with pytest.raises(NotFound):
        e.unload_adapter("missing")
    with pytest.raises(NotFound):
        e.load_adapter("x", "adapters/missing/1")
    with pytest.raises(InvalidArgument, match="outside the artifact store"):
        e.load_adapter("x", tmp_path)
    with pytest.raises(InvalidArgument, match=r"without '\.\.'"):
        e.load_adapter("x", "../adapters/attn/1")
    e.load_adapter("x", "adapters/attn/1")
    with pytest.raises(InvalidArgument, match="already loaded"):
        e.load_adapter("x", "adapters/mlp/1")
    with pytest.raises(FailedPrecondition):
        LLMEngine(load_model("models/llama/1", store)).load_adapter("x", "adapters/attn/1")


def test_an_adapter_without_a_valid_rank_is_refused(store: ArtifactStore, merged_outputs) -> None:
    broken = store.root / "adapters/norank/1"
    shutil.copytree(store.root / "adapters/attn/1", broken)
    config = json.loads((broken / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**config, "r": 0}))
    with pytest.raises(InvalidArgument, match="rank r 0"):
        engine(store).load_adapter("x", "adapters/norank/1")
