"""The inference core's request and load options: beam search, LoRA adapters by name, RoPE scaling,
memory admission control and speculative-decoding counters; served in-process, checked against the
engine and transformers."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch
from peft import LoraConfig, get_peft_model
from prometheus_client import REGISTRY
from transformers import AutoModelForCausalLM

from libs.common.artifacts import ArtifactStore
from libs.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from services.inference.core import InferenceCore
from services.inference.engine import SamplingParams, kernels
from services.inference.schema import EngineOptions, GenerateInput, ModelSpec, ReplicaOptions
from tests.helpers.inference_core import make_core
from tests.helpers.tiny_models import TINY, save_tiny_model

PROMPT = [5, 17, 99, 3, 42, 8]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ArtifactStore:
    store = ArtifactStore(tmp_path_factory.mktemp("artifacts"))
    save_tiny_model(store.root)
    base = AutoModelForCausalLM.from_pretrained(store.root / TINY)
    torch.manual_seed(3)
    lora = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    lora.save_pretrained(store.root / "adapters/style/1")
    return store


def hf_generate(model: torch.nn.Module, **kwargs: object) -> list[list[int]]:
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=8, pad_token_id=0, **kwargs)
    return [row[len(PROMPT) :].tolist() for row in out]


async def tokens(core: InferenceCore, params: SamplingParams, model: str = "tiny") -> list[list[int]]:
    chunk = await core.generate(model, GenerateInput("", params, token_ids=tuple(PROMPT)))
    return [c.token_ids for c in chunk.completions]


def test_beam_search_and_adapters_by_name(store: ArtifactStore) -> None:
    async def scenario() -> None:
        core = make_core(store)
        await core.load_model(ModelSpec("tiny", TINY))
        beams = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, beam_width=3, n=2, length_penalty=0.5)
        reference = AutoModelForCausalLM.from_pretrained(store.root / TINY).eval()
        expected = hf_generate(reference, num_beams=3, num_return_sequences=2, length_penalty=0.5, do_sample=False)
        assert await tokens(core, beams) == expected

        greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        with pytest.raises(NotFound) as e:
            await tokens(core, dataclasses.replace(greedy, adapter="style"))
        assert e.value.field == "adapter"
        info = await core.load_adapter("tiny", "style", "adapters/style/1")
        assert info.adapters == ("style",)
        with pytest.raises(AlreadyExists):
            await core.load_adapter("tiny", "style", "adapters/style/1")
        with pytest.raises(NotFound):
            await core.load_adapter("tiny", "other", "adapters/missing/1")

        base = AutoModelForCausalLM.from_pretrained(store.root / TINY)
        merged = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
        merged.load_adapter(str(store.root / "adapters/style/1"), adapter_name="default")
        with_adapter = hf_generate(merged.merge_and_unload().eval(), do_sample=False)
        assert await tokens(core, dataclasses.replace(greedy, adapter="style")) == with_adapter
        assert await tokens(core, greedy) == hf_generate(reference, do_sample=False) != with_adapter

        assert (await core.unload_adapter("tiny", "style")).adapters == ()
        with pytest.raises(NotFound):
            await tokens(core, dataclasses.replace(greedy, adapter="style"))
        await core.drain()

    asyncio.run(scenario())


def test_rope_scaling_extends_the_context_it_enforces(store: ArtifactStore) -> None:
    async def scenario() -> None:
        core = make_core(store)
        plain = await core.load_model(ModelSpec("plain", TINY))
        yarn = EngineOptions(rope_scaling='{"rope_type": "yarn", "factor": 4}')
        scaled = await core.load_model(ModelSpec("long", TINY, engine=yarn))
        assert (plain.context_length, scaled.context_length) == (128, 512)
        long_prompt = GenerateInput("", SamplingParams(max_tokens=4), token_ids=tuple(range(200)))
        with pytest.raises(InvalidArgument) as e:
            await core.generate("plain", long_prompt)
        assert e.value.field == "prompt" and "128" in str(e.value)
        assert len((await core.generate("long", long_prompt)).completions[0].token_ids) == 4
        for bad in ('{"rope_type": "sideways", "factor": 2}', '{"rope_type": "linear", "factor": 0.5}', "linear"):
            with pytest.raises(InvalidArgument) as e:
                await core.load_model(ModelSpec("bad", TINY, engine=EngineOptions(rope_scaling=bad)))
            assert "rope_scaling" in (e.value.field or "")
        await core.drain()

    asyncio.run(scenario())


def test_admission_control_refuses_what_does_not_fit_with_the_figures(store: ArtifactStore) -> None:
    async def scenario() -> None:
        core = make_core(store)
        small = ReplicaOptions(memory_bytes=8 * 2**20)
        with pytest.raises(ResourceExhausted) as e:
            await core.load_model(ModelSpec("tiny", TINY, small, EngineOptions(kv_cache_bytes=16 * 2**20)))
        message = str(e.value)
        assert "GiB of weights" in message and "KV cache" in message and e.value.field == "replicas.memory_bytes"
        # the same model fits once the KV cache is sized to the replica
        fits = await core.load_model(ModelSpec("tiny", TINY, small, EngineOptions(kv_cache_bytes=2 * 2**20)))
        assert fits.facts.weight_bytes == 4 * fits.facts.parameters  # fp32
        with pytest.raises(InvalidArgument) as e:
            await core.load_model(ModelSpec("none", TINY, engine=EngineOptions(kv_cache_bytes=100)))
        assert e.value.field == "engine.kv_cache_bytes"
        assert core.model_names() == ["tiny"]  # nothing half-loaded
        await core.drain()

    asyncio.run(scenario())


def kept_plain_bytes(core: InferenceCore, name: str) -> int:
    """Bytes of the plain weights a loaded model's decoder keeps beside its packed ones."""
    runner = core._models[name].handle.server.engine.runner  # type: ignore[attr-defined]  # the local backend's
    packs = [f.packed for layer in runner.decoder.layers for f in (layer.qkv, layer.gate_up) if f and f.packed]
    packs += [m._llmp_packed for m in runner.model.modules() if hasattr(m, "_llmp_packed")]
    assert packs, "nothing was packed"
    return sum(p.kept.numel() * p.kept.element_size() for p in packs if p.kept is not None)


@pytest.mark.skipif(not kernels.few_rows_limit(), reason="the few-rows kernel needs AVX-512 BF16, which this CPU lacks")
def test_the_plain_copy_of_bfloat16_weights_is_counted_and_packed_only_drops_it(store: ArtifactStore) -> None:
    """A bfloat16 model keeps each projection's plain weight beside the packed one (for steps of a few
    rows): the memory check's figure is what the replica really holds, and `packed_only` keeps none."""

    async def scenario() -> None:
        core = make_core(store)
        both = await core.load_model(ModelSpec("both", TINY, engine=EngineOptions(dtype="bfloat16")))
        assert both.facts.plain_copy_bytes > 0
        assert kept_plain_bytes(core, "both") == both.facts.plain_copy_bytes
        packed = await core.load_model(
            ModelSpec("packed", TINY, engine=EngineOptions(dtype="bfloat16", packed_only=True))
        )
        assert packed.facts.plain_copy_bytes == 0 and kept_plain_bytes(core, "packed") == 0
        fp32 = await core.load_model(ModelSpec("fp32", TINY))
        assert fp32.facts.plain_copy_bytes == 0 and kept_plain_bytes(core, "fp32") == 0
        params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        answers = [
            (await core.generate(name, GenerateInput("", params, token_ids=tuple(PROMPT)))).completions[0].token_ids
            for name in ("both", "packed")
        ]
        assert answers[0] == answers[1]
        # the copy counts against a replica's memory, and the refusal says how to drop it
        need = both.facts.weight_bytes + both.facts.plain_copy_bytes + 2 * 2**20
        tight = ReplicaOptions(memory_bytes=need - 1)
        with pytest.raises(ResourceExhausted) as e:
            await core.load_model(
                ModelSpec("tight", TINY, tight, EngineOptions(dtype="bfloat16", kv_cache_bytes=2 * 2**20))
            )
        assert "packed_only" in str(e.value)
        engine = EngineOptions(dtype="bfloat16", kv_cache_bytes=2 * 2**20, packed_only=True)
        assert (await core.load_model(ModelSpec("tight", TINY, tight, engine))).facts.plain_copy_bytes == 0
        await core.drain()

    asyncio.run(scenario())


def test_speculative_acceptance_is_counted_per_model_and_in_metrics(store: ArtifactStore) -> None:
    def counter(name: str) -> float:
        return REGISTRY.get_sample_value(name, {"model": "spec"}) or 0.0

    async def scenario() -> None:
        core = make_core(store)
        await core.load_model(ModelSpec("spec", TINY, engine=EngineOptions(speculative="ngram")))
        drafted_before = counter("llmp_spec_decode_num_draft_tokens_total")
        repetitive = tuple([7, 8, 9, 10] * 6)
        params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
        chunk = await core.generate("spec", GenerateInput("", params, token_ids=repetitive))
        drafted = chunk.completions[0].draft_tokens
        accepted = chunk.completions[0].accepted_draft_tokens
        assert drafted > 0 and 0 <= accepted <= drafted
        info = await core.model_info("spec")
        assert (info.load.draft_tokens, info.load.accepted_draft_tokens) == (drafted, accepted)
        assert counter("llmp_spec_decode_num_draft_tokens_total") - drafted_before == drafted
        await core.drain()

    asyncio.run(scenario())


def test_adapters_in_use_cannot_be_unloaded(store: ArtifactStore) -> None:
    async def scenario() -> None:
        core = make_core(store)
        await core.load_model(ModelSpec("tiny", TINY))
        await core.load_adapter("tiny", "style", "adapters/style/1")
        params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True, adapter="style")
        stream = core.stream("tiny", GenerateInput("busy", params, token_ids=tuple(PROMPT)))
        await anext(stream)
        with pytest.raises(FailedPrecondition):
            await core.unload_adapter("tiny", "style")
        await stream.aclose()
        assert (await core.unload_adapter("tiny", "style")).adapters == ()
        await core.drain()

    asyncio.run(scenario())
