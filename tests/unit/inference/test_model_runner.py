"""The paged forward against transformers' own forward, for every architecture, in fp32."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from libs.common.artifacts import ArtifactStore
from services.inference.engine import KVCacheConfig, load_model
from services.inference.engine.batch import StepChunk
from services.inference.engine.decoder import dense
from services.inference.engine.kv_cache import KVCache
from services.inference.engine.model_runner import ModelRunner
from tests.helpers.tiny_models import CONFIGS, NEEDS_COMPILER, prompt

ATOL = 1e-4


def reference_and_runner(store: ArtifactStore, arch: str, prompts: list[list[int]], compile: bool = False):
    model = load_model(f"models/{arch}/1", store).module
    with torch.no_grad():
        reference = [model(torch.tensor([p])).logits[0] for p in prompts]  # each [len, vocab]
    cache = KVCache(model.config, KVCacheConfig(block_size=4, num_blocks=64))
    for i, p in enumerate(prompts):
        cache.allocate(str(i), len(p))
    return reference, ModelRunner(model, cache, compile=compile)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_prefill_in_chunks_then_decode_matches_transformers(store: ArtifactStore, arch: str) -> None:
    tokens = prompt(30, seed=1)
    (reference,), runner = reference_and_runner(store, arch, [tokens])
    for start, stop in [(0, 11), (11, 12), (12, 25), (25, 26), (26, 30)]:
        logits = runner.forward([StepChunk("0", tokens[start:stop], start, sample=True)])
        torch.testing.assert_close(logits[0], reference[stop - 1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt2"])
def test_a_mixed_step_matches_each_sequence_alone(store: ArtifactStore, arch: str) -> None:
    prompts = [prompt(n, seed=n) for n in (9, 14, 21, 6)]
    reference, runner = reference_and_runner(store, arch, prompts)
    # Sequences 0 and 1 have most of their tokens cached already; 2 and 3 arrive now.
    runner.forward([StepChunk("0", prompts[0][:8], 0, False), StepChunk("1", prompts[1][:13], 0, False)])
    chunks = [
        StepChunk("0", prompts[0][8:], 8, True),
        StepChunk("2", prompts[2][:15], 0, False),
        StepChunk("1", prompts[1][13:], 13, True),
        StepChunk("3", prompts[3], 0, True),
    ]
    logits = runner.forward(chunks)
    assert logits.shape == (3, 256)
    for row, (seq, pos) in enumerate([(0, 8), (1, 13), (3, 5)]):
        torch.testing.assert_close(logits[row], reference[seq][pos], atol=ATOL, rtol=0)


def test_the_model_still_runs_transformers_generate(store: ArtifactStore) -> None:
    tokens = torch.tensor([prompt(12, seed=3)])
    model = load_model("models/llama/1", store).module
    before = model.generate(tokens, max_new_tokens=5, do_sample=False)
    ModelRunner(model, KVCache(model.config, KVCacheConfig(block_size=4, num_blocks=8)))
    assert torch.equal(model.generate(tokens, max_new_tokens=5, do_sample=False), before)


def test_llama_style_models_run_the_fused_pass_with_no_extra_memory(store: ArtifactStore) -> None:
    model = load_model("models/llama/1", store).module
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    runner = ModelRunner(model, KVCache(model.config, KVCacheConfig(block_size=4, num_blocks=8)))
    assert runner.decoder is not None
    attn = model.model.layers[0].self_attn
    fused = attn.q_proj.weight.untyped_storage().data_ptr()
    assert attn.k_proj.weight.untyped_storage().data_ptr() == fused == attn.v_proj.weight.untyped_storage().data_ptr()
    for name, p in model.named_parameters():  # the same values, now views of the fused tensors
        assert torch.equal(p, params[name]), name
    gpt2 = load_model("models/gpt2/1", store).module
    assert ModelRunner(gpt2, KVCache(gpt2.config, KVCacheConfig(block_size=4, num_blocks=8))).decoder is None


def test_the_fused_pass_keeps_projection_biases(store: ArtifactStore) -> None:
    torch.manual_seed(0)
    config = CONFIGS["llama"]()
    config.attention_bias = config.mlp_bias = True
    model = AutoModelForCausalLM.from_config(config).eval()
    for module in model.modules():  # from_config leaves biases at zero
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            torch.nn.init.normal_(module.bias, std=0.5)
    tokens = prompt(10, seed=4)
    with torch.no_grad():
        reference = model(torch.tensor([tokens])).logits[0]
    cache = KVCache(model.config, KVCacheConfig(block_size=4, num_blocks=8))
    cache.allocate("0", len(tokens))
    logits = ModelRunner(model, cache).forward([StepChunk("0", tokens, 0, sample=True)])
    torch.testing.assert_close(logits[0], reference[-1], atol=ATOL, rtol=0)


@NEEDS_COMPILER
def test_compiled_decode_steps_match_transformers(store: ArtifactStore) -> None:
    """Decode steps of one, two and three sequences, contexts of one block and several, unequal in a
    batch: each row's logits transformers' own, from no more than two compiled graphs (batches of one
    and of more). A minute or more: the graphs compile."""
    from torch._dynamo.utils import counters

    prompts = [prompt(n, seed=n) for n in (16, 10, 6)]
    reference, runner = reference_and_runner(store, "llama", prompts, compile=True)
    assert runner.compiled is not None
    graphs = counters["stats"]["unique_graphs"]
    runner.forward([StepChunk("0", prompts[0][:10], 0, False), StepChunk("1", prompts[1][:4], 0, False)])  # eager
    runner.forward([StepChunk("2", prompts[2][:1], 0, False)])  # eager

    def decode(steps: dict[int, int]) -> None:  # sequence -> position
        chunks = [StepChunk(str(seq), [prompts[seq][pos]], pos, True) for seq, pos in steps.items()]
        logits = runner.forward(chunks)
        for row, (seq, pos) in enumerate(steps.items()):
            torch.testing.assert_close(logits[row], reference[seq][pos], atol=ATOL, rtol=0)

    decode({2: 1})  # alone, a context of one block
    for step in range(3):
        decode({0: 10 + step, 1: 4 + step, 2: 2 + step})
    decode({1: 7})  # alone, two blocks
    decode({0: 13, 1: 8})
    assert runner.compiled is not None, "the compiled graph failed and the runner fell back to eager"
    assert counters["stats"]["unique_graphs"] - graphs <= 2

    # A model of other shapes in the same process compiles graphs of its own, its sizes static.
    torch.manual_seed(1)
    config = CONFIGS["llama"]()
    config.hidden_size, config.num_attention_heads, config.num_key_value_heads = 96, 6, 3
    other = AutoModelForCausalLM.from_config(config).eval()
    tokens = prompt(7, seed=5)
    with torch.no_grad():
        expected = other(torch.tensor([tokens])).logits[0]
    cache = KVCache(other.config, KVCacheConfig(block_size=4, num_blocks=16))
    cache.allocate("x", len(tokens))
    runner = ModelRunner(other, cache, compile=True)
    runner.forward([StepChunk("x", tokens[:6], 0, False)])
    (logits,) = runner.forward([StepChunk("x", tokens[6:], 6, True)])
    torch.testing.assert_close(logits, expected[6], atol=ATOL, rtol=0)
    assert runner.compiled is not None, "the second model's graph failed and the runner fell back to eager"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_computes_what_f_linear_computes(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x, weight, bias = torch.randn(5, 64, dtype=dtype), torch.randn(96, 64, dtype=dtype), torch.randn(96, dtype=dtype)
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    for b in (bias, None):
        expected = torch.nn.functional.linear(x.float(), weight.float(), None if b is None else b.float())
        got = dense(x, weight, b)
        assert got.shape == (5, 96) and got.dtype == dtype
        torch.testing.assert_close(got.float(), expected, atol=tolerance * 10, rtol=tolerance)
    compiled = torch.compile(dense)  # the opaque op inside a compiled graph
    torch.testing.assert_close(compiled(x, weight, bias).float(), dense(x, weight, bias).float())


def packed_and_plain(store: ArtifactStore, dtype: torch.dtype, compile: bool = False, few_rows: bool = False):
    """The same Llama twice (two copies): one runner packs its weights (`few_rows`: bfloat16 ones keep
    their plain layout too), the other keeps them plain."""
    runners = []
    for pack in (True, False):
        model = load_model("models/llama/1", store, dtype=dtype).module
        cache = KVCache(model.config, KVCacheConfig(block_size=4, num_blocks=16), dtype=dtype)
        runners.append(ModelRunner(model, cache, compile=compile, pack=pack, few_rows=few_rows and pack))
    return runners


def steps(runner: ModelRunner, tokens: list[int]) -> list[torch.Tensor]:
    """A prompt's prefill, then decode steps of one token: the logits of each step."""
    runner.cache.allocate("0", len(tokens))
    out = [runner.forward([StepChunk("0", tokens[:6], 0, True)])]
    out += [runner.forward([StepChunk("0", [tokens[pos]], pos, True)]) for pos in range(6, len(tokens))]
    runner.cache.free("0")
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_weights_compute_what_plain_ones_do_and_take_no_memory(store: ArtifactStore, dtype: torch.dtype) -> None:
    packed, plain = packed_and_plain(store, dtype)
    attn = packed.model.model.layers[0].self_attn
    assert attn.q_proj.weight.untyped_storage().nbytes() == torch.empty((), dtype=dtype).element_size(), "a stand-in"
    assert attn.q_proj.weight.shape == plain.model.model.layers[0].self_attn.q_proj.weight.shape
    tokens = prompt(12, seed=6)
    for a, b in zip(steps(packed, tokens), steps(plain, tokens), strict=True):
        torch.testing.assert_close(a, b, atol=ATOL if dtype == torch.float32 else 2e-2, rtol=0)


def test_a_hook_added_after_packing_gets_the_plain_weights_back(store: ArtifactStore) -> None:
    """An adapter loaded after the weights were packed hooks the modules, which are then called on their
    own: they compute with their plain weights again (qkv fused, o_proj bare, and the output head)."""
    packed, plain = packed_and_plain(store, torch.float32)
    tokens = prompt(10, seed=7)
    for runner in (packed, plain):
        steps(runner, tokens)  # the packed one runs packed first
        layer = runner.model.model.layers[1]
        for module in (layer.self_attn.k_proj, layer.self_attn.o_proj, runner.model.get_output_embeddings()):
            module.register_forward_hook(lambda m, args, out: out * 1.5)
    hooked = steps(packed, tokens)
    for a, b in zip(hooked, steps(plain, tokens), strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    k_proj = packed.model.model.layers[1].self_attn.k_proj
    assert torch.equal(k_proj.weight, plain.model.model.layers[1].self_attn.k_proj.weight)


@NEEDS_COMPILER
@pytest.mark.parametrize(("dtype", "few_rows"), [(torch.float32, False), (torch.bfloat16, True)])
def test_compiled_decode_steps_run_on_packed_weights(store: ArtifactStore, dtype: torch.dtype, few_rows: bool) -> None:
    """bfloat16 with `few_rows`: one-row decode steps read the plain weights through the engine's own
    kernel where the CPU has AVX-512 BF16, prefill rows the packed ones."""
    packed, plain = packed_and_plain(store, dtype, compile=True, few_rows=few_rows)
    tokens = prompt(9, seed=8)
    for a, b in zip(steps(packed, tokens), steps(plain, tokens), strict=True):
        torch.testing.assert_close(a, b, atol=ATOL if dtype == torch.float32 else 2e-2, rtol=0)
    assert packed.compiled is not None, "the compiled graph failed on packed weights and fell back to eager"
