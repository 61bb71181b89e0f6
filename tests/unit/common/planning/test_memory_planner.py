"""Memory planner: hand-computed byte counts, a real Llama model as referee, and the seed's figures."""

from __future__ import annotations

import pytest

from libs.common.errors import InvalidArgument
from libs.common.planning import (
    GB,
    GIB,
    ModelShape,
    kv_cache_bytes,
    kv_cache_bytes_per_token,
    seed_checks,
    training_memory,
    weight_bytes,
    weight_format,
)
from libs.common.planning.seed_check import LLAMA_2_7B, LLAMA_3_8B, LLAMA_70B

TINY = ModelShape(num_layers=2, hidden_size=64, num_heads=4, vocab_size=100, intermediate_size=256)


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("fp32", 28_000_000_000),
        ("bf16", 14_000_000_000),
        ("int8", 7_000_000_000),
        # 3.5e9 + ceil(7e9 / 128) = 54,687,500 groups x 20 bits / 8
        ("int4", 3_500_000_000 + 136_718_750),
        ("int2", 1_750_000_000 + 123_046_875),  # 54,687,500 groups x 18 bits / 8
        ("nf4", 3_500_000_000 + 437_500_000),  # 109,375,000 blocks x 4-byte absmax
    ],
)
def test_weight_bytes_for_seven_billion_parameters(fmt: str, expected: int) -> None:
    assert weight_bytes(7_000_000_000, fmt) == expected


def test_group_size_and_metadata_can_be_changed() -> None:
    assert weight_format("int4").bits_per_weight() == 4 + 20 / 128
    assert weight_format("nf4_dq").bits_per_weight() == pytest.approx(4 + 8.125 / 64)
    assert weight_bytes(7_000_000_000, weight_format("int4", group_size=32)) == 3_500_000_000 + 546_875_000
    assert weight_bytes(1024, weight_format("int4", group_size=1000, scale_bits=16)) == 512 + 2 * 2
    with pytest.raises(InvalidArgument, match="format"):
        weight_format("int3")
    with pytest.raises(InvalidArgument, match="group_size"):
        weight_format("int4", group_size=0)


def test_param_counts_of_published_configs() -> None:
    assert LLAMA_3_8B.param_count() == 8_030_261_248
    assert LLAMA_2_7B.param_count() == 6_738_415_616


def test_hf_config_keys_of_several_families() -> None:
    llama = ModelShape.from_hf_config(
        {
            "num_hidden_layers": 32,
            "hidden_size": 4096,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "intermediate_size": 14336,
            "vocab_size": 128256,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
        }
    )
    assert llama == LLAMA_3_8B
    gpt2 = ModelShape.from_hf_config(
        {
            "n_layer": 12,
            "n_embd": 768,
            "n_head": 12,
            "vocab_size": 50257,
            "n_inner": None,
            "activation_function": "gelu_new",
            "tie_word_embeddings": True,
        }
    )
    # GPT-2 small has 124,439,808 weights; biases and the position table are left out here.
    assert gpt2.param_count() == pytest.approx(124_439_808, rel=0.01)
    assert kv_cache_bytes_per_token(gpt2, "fp16") == 2 * 12 * 12 * 64 * 2
    with pytest.raises(InvalidArgument, match="vocab_size"):
        ModelShape.from_hf_config({"n_layer": 1, "n_embd": 8, "n_head": 1})


def test_kv_cache_of_llama_3_8b_and_the_70b_example() -> None:
    assert kv_cache_bytes_per_token(LLAMA_3_8B) == 2 * 32 * 8 * 128 * 2 == 128 * 1024
    assert kv_cache_bytes(LLAMA_3_8B, tokens=4096) == GIB // 2
    assert kv_cache_bytes(LLAMA_3_8B, tokens=4096, batch=8, dtype="fp8") == 2 * GIB
    assert kv_cache_bytes(LLAMA_70B, tokens=4096) == 1_342_177_280
    with pytest.raises(InvalidArgument, match="dtype"):
        kv_cache_bytes(LLAMA_3_8B, tokens=1, dtype="int3")


def test_training_memory_by_hand_for_a_tiny_model() -> None:
    params = TINY.param_count()
    # Per layer: attention 4 * 64^2, SwiGLU 3 * 64 * 256, two norms; embeddings untied; final norm.
    assert params == 2 * (4 * 64 * 64 + 3 * 64 * 256 + 2 * 64) + 2 * 100 * 64 + 64 == 144_192
    mem = training_memory(TINY, batch=2, seq_len=32)
    assert (mem.weights, mem.gradients, mem.optimizer, mem.master_weights) == (
        2 * params,
        2 * params,
        8 * params,
        4 * params,
    )
    logits = 4 * 32 * 2 * 100
    assert mem.activations == 2 * 34 * 32 * 2 * 64 + logits
    unfused = training_memory(TINY, batch=2, seq_len=32, fused_attention=False)
    assert unfused.activations - mem.activations == 2 * 5 * 4 * 32 * 32 * 2
    checkpointed = training_memory(TINY, batch=2, seq_len=32, checkpointing=True)
    assert checkpointed.activations == 2 * 2 * 32 * 2 * 64 + logits
    fp32 = training_memory(TINY, batch=2, seq_len=32, precision="fp32", optimizer="sgd")
    assert (fp32.weights, fp32.optimizer, fp32.master_weights) == (4 * params, 0, 0)
    assert fp32.total == 8 * params + 2 * (2 * 34 * 32 * 2 * 64) + logits
    with pytest.raises(InvalidArgument, match="precision"):
        training_memory(TINY, 1, 8, precision="fp8")


def test_adamw_mixed_precision_needs_about_16_bytes_per_parameter() -> None:
    mem = training_memory(LLAMA_3_8B, batch=1, seq_len=4096, checkpointing=True)
    params = LLAMA_3_8B.param_count()
    assert mem.total - mem.activations == 16 * params
    assert mem.total == pytest.approx(16 * params, rel=0.05)
    assert mem.total > 80 * GB  # so an 8B model does not fit one 80 GB device without sharding


def test_param_count_and_kv_cache_match_a_real_llama_model() -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        vocab_size=100,
    )
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    shape = ModelShape.from_hf_config(config.to_dict())
    assert shape.param_count() == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        out = model(torch.zeros(3, 10, dtype=torch.long), use_cache=True)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    cached = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert cached == kv_cache_bytes(shape, tokens=10, batch=3, dtype="bf16")


def test_seed_figures_against_the_formulas() -> None:
    checks = {c.item: c for c in seed_checks()}
    agreeing = {item for item, c in checks.items() if c.agrees}
    assert agreeing == {
        "7B weights, bf16, 16 bits flat",
        "7B weights, int8, 8 bits flat",
        "7B weights, int4, 4 bits flat",
        "7B weights, int2, 2 bits flat",
        "Llama-3-8B KV cache, bf16, 4K tokens",
        "tokens for a compute-optimal 175B model",
    }
    assert all(c.note for item, c in checks.items() if item not in agreeing)
    assert checks["70B (80 layers, 8 KV heads, head dim 128) KV cache, bf16, 4K tokens"].computed == pytest.approx(
        1.342, abs=1e-3
    )
    assert checks["compute-optimal params at GPT-3's budget"].computed == pytest.approx(51.23e9, rel=1e-3)
