"""Quantised replicas: accuracy on real text, size, kernels, pre-quantised files, generation."""

from __future__ import annotations

import pydoc_data.topics

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from libs.common.artifacts import ArtifactStore
from libs.common.errors import FailedPrecondition, InvalidArgument
from services.inference.engine import EngineConfig, KVCacheConfig, LLMEngine, LoadedModel, SamplingParams, load_model
from services.inference.engine.quantization import (
    DEQUANTIZE,
    INT4_KERNEL,
    INT8_KERNEL,
    QUANTIZATION_FILE,
    QuantizedLinear,
    save_quantized,
)

TEXT = "".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)).encode()  # about 0.5 MB
TRAIN, HELDOUT = TEXT[:-8192], TEXT[-8192:]
SEQ = 64


def batches(steps: int, batch: int, seed: int = 0):
    data = torch.frombuffer(bytearray(TRAIN), dtype=torch.uint8).long()
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - SEQ, (batch,), generator=g)
        yield torch.stack([data[s : s + SEQ] for s in starts])  # [batch, SEQ]


@pytest.fixture(scope="module")
def trained(store: ArtifactStore) -> str:
    """A byte-level Llama (hidden 128, 2 layers) trained 200 steps on Python's reference text (~15 s)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, max_position_embeddings=256, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls: a second thread costs more than it gives on a busy machine
    try:
        for ids in batches(200, 16):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    heldout = torch.frombuffer(bytearray(HELDOUT), dtype=torch.uint8).long()[: 8 * SEQ].view(8, SEQ)
    with torch.no_grad():
        loss = model(input_ids=heldout, labels=heldout).loss.item()
    assert loss < 2.7, loss  # nats per byte on held-out text; byte frequencies alone give 3.26: it learnt more
    location = "models/pydoc-llama/1"
    model.save_pretrained(store.root / location, safe_serialization=True)
    return location


def heldout_logits(model: LoadedModel) -> torch.Tensor:
    """Next-byte logits at every position of 8 held-out windows: [8 * SEQ, vocab], centred per row."""
    ids = torch.frombuffer(bytearray(HELDOUT), dtype=torch.uint8).long()[: 8 * SEQ].view(8, SEQ)
    with torch.no_grad():
        logits = model.module(input_ids=ids).logits.float().flatten(0, 1)
    return logits - logits.mean(-1, keepdim=True)  # softmax ignores a shift


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx - exact).norm() / exact.norm())


@pytest.fixture(scope="module")
def full(trained: str, store: ArtifactStore) -> torch.Tensor:
    return heldout_logits(load_model(trained, store))


# Bounds. Rounding moves a weight by at most half a step, uniformly, so its RMS error is step/sqrt(12):
# INT8 per channel, step = absmax/127 with absmax ~ 4 x the row's RMS: ~1% of a weight's RMS;
# INT4 in groups of 64, step = range/15 with range ~ 5 x RMS: ~10%. The errors of different
# weights are independent and the unquantised embeddings, residual stream and head carry much of
# the logits, so the logits' relative error stays below one weight's: bounded at 1% and 10%
# (measured 0.14% and 1.1%; a wrong scale layout or group order would be off by ~100%). The greedy
# next byte can change only where the top two logits are closer than that error: rarely.
BOUNDS = {"int8": (1e-2, 0.99, 1.1, INT8_KERNEL), "int4": (0.1, 0.95, 0.6, INT4_KERNEL)}


@pytest.mark.parametrize("method", list(BOUNDS))
def test_quantised_logits_stay_close_on_real_text(trained, store, full, method: str) -> None:
    max_error, min_agreement, max_bytes, kernel = BOUNDS[method]
    model = load_model(trained, store, quantization={"type": method})
    logits = heldout_logits(model)
    agreement = float((logits.argmax(-1) == full.argmax(-1)).float().mean())
    report = model.quantization
    assert report is not None
    print(
        f"{method}: logits error {relative_error(logits, full):.4f}, greedy agreement {agreement:.3f}, "
        f"{report.bytes_per_parameter:.4f} bytes/param ({report.model_bytes_per_parameter:.3f} whole model)"
    )
    assert relative_error(logits, full) < max_error
    assert agreement >= min_agreement
    assert report.bytes_per_parameter <= max_bytes
    assert dict(report.kernels) == {kernel: 14}  # 7 linear layers per block, 2 blocks; lm_head kept
    assert model.num_parameters == load_model(trained, store).num_parameters


def test_groupwise_int8_falls_back_to_dequantise_and_says_so(trained, store, full) -> None:
    model = load_model(trained, store, quantization={"type": "int8", "group_size": 64})
    assert model.quantization is not None
    assert dict(model.quantization.kernels) == {DEQUANTIZE: 14}
    assert relative_error(heldout_logits(model), full) < 1e-2


def test_lm_head_is_quantised_only_when_asked(trained, store) -> None:
    model = load_model(trained, store, quantization={"type": "int4", "lm_head": True})
    assert isinstance(model.module.get_output_embeddings(), QuantizedLinear)
    assert isinstance(model.module.get_input_embeddings(), torch.nn.Embedding)
    assert sum(model.quantization.kernels.values()) == 15  # type: ignore[union-attr]


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_prequantised_safetensors_round_trip(trained, store, method: str) -> None:
    model = load_model(trained, store, quantization={"type": method})
    assert model.quantization is not None
    target = store.root / f"models/pydoc-llama-{method}/1"
    save_quantized(model.module, model.quantization, target)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors", QUANTIZATION_FILE]
    loaded = load_model(f"models/pydoc-llama-{method}/1", store)
    assert loaded.quantization is not None and loaded.quantization.spec == model.quantization.spec
    assert dict(loaded.quantization.kernels) == dict(model.quantization.kernels)
    assert torch.equal(heldout_logits(loaded), heldout_logits(model))
    with pytest.raises(InvalidArgument, match="quantization"):
        load_model(f"models/pydoc-llama-{method}/1", store, quantization="int8")


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_engine_generates_on_a_quantised_replica_like_generate(trained, store, method: str) -> None:
    model = load_model(trained, store, quantization={"type": method})
    prompts = [list(b"def __init__(self"), list(b"The with statement"), list(b"class ")]
    engine = LLMEngine(model, EngineConfig(KVCacheConfig(block_size=4, num_blocks=64)))
    outputs = engine.generate(prompts, SamplingParams(max_tokens=10, temperature=0))
    for prompt, out in zip(prompts, outputs, strict=True):
        with torch.no_grad():
            expected = model.module.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)
        assert out.outputs[0].token_ids == expected[0, len(prompt) :].tolist()


def test_gpt2_conv1d_layers_are_quantised(store) -> None:
    model = load_model("models/gpt2/1", store, quantization="int8")
    assert model.quantization is not None
    assert dict(model.quantization.kernels) == {INT8_KERNEL: 8}  # c_attn, c_proj, c_fc, mlp c_proj per block
    ids = torch.tensor([list(range(20))])
    with torch.no_grad():
        approx = model.module(input_ids=ids).logits
        exact = load_model("models/gpt2/1", store).module(input_ids=ids).logits
    assert relative_error(approx, exact) < 1e-2  # the INT8 bound above


def test_bad_specs_are_refused(trained, store) -> None:
    with pytest.raises(InvalidArgument, match=r"quantization\.type"):
        load_model(trained, store, quantization={"type": "int3"})
    with pytest.raises(InvalidArgument, match="group_size"):
        load_model(trained, store, quantization={"type": "int4", "group_size": 33})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_nf4_is_refused_without_a_gpu(trained, store) -> None:
    with pytest.raises(FailedPrecondition, match="CUDA GPU"):
        load_model(trained, store, quantization="nf4")


@pytest.mark.gpu
def test_nf4_on_a_gpu(trained, store, full) -> None:
    pytest.importorskip("bitsandbytes")
    model = load_model(trained, store, device="cuda", quantization="nf4")
    assert model.quantization is not None and model.quantization.bytes_per_parameter <= 0.6
    assert relative_error(heldout_logits(model).cpu(), full) < 0.1  # as INT4: 16 levels per block of 64
