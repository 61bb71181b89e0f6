"""Memory planner: bytes of weights per number format, KV cache per token, and training memory.

Everything is a closed-form count from the model's shape, so the training service can refuse a job
that cannot fit before starting anything, and the inference service can size its KV cache.

- Weights: ``params * bits / 8`` plus, for group-quantised formats, the per-group metadata (scale,
  zero point) of ``ceil(params / group_size) * scale_bits / 8`` bytes.
- KV cache: ``2 (K and V) * layers * kv_heads * head_dim * bytes_per_value`` per token. With grouped-
  query attention ``kv_heads`` is below the number of query heads, which is what keeps it small.
- Training: weights + gradients + optimiser states (+ fp32 master weights under mixed precision)
  + activations, the last estimated per layer after Korthikanti et al., "Reducing Activation
  Recomputation in Large Transformer Models" (2022): ``s * b * h * (34 + 5 * a * s / h)`` bytes at
  16-bit, where the ``5 a s / h`` term (attention scores) vanishes with fused attention and only
  the layer input ``2 s b h`` is kept under full activation checkpointing.

Sizes are bytes (int); ``GB`` is 10^9 bytes and ``GiB`` 2^30 bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from libs.common.errors import InvalidArgument

GB = 10**9
GIB = 2**30


@dataclass(frozen=True)
class WeightFormat:
    """How one weight is stored: its bits, and the metadata shared by each group of weights."""

    name: str
    bits: int
    """Bits per weight."""
    group_size: int | None = None
    """Weights sharing one set of quantisation metadata; None when the overhead is negligible."""
    scale_bits: float = 0.0
    """Bits of metadata (scale, zero point) per group."""

    def weight_bytes(self, params: int) -> float:
        groups = math.ceil(params / self.group_size) if self.group_size else 0
        return params * self.bits / 8 + groups * self.scale_bits / 8

    def bits_per_weight(self) -> float:
        """Effective bits per weight, metadata included."""
        return self.bits + (self.scale_bits / self.group_size if self.group_size else 0.0)


FORMATS: dict[str, WeightFormat] = {
    f.name: f
    for f in (
        WeightFormat("fp32", 32),
        WeightFormat("bf16", 16),
        WeightFormat("fp16", 16),
        # One fp32 scale per output row: about 4 bytes per 4096 weights, left out.
        WeightFormat("int8", 8),
        # GPTQ/AWQ layout: per group of 128 an fp16 scale and a 4-bit zero point.
        WeightFormat("int4", 4, group_size=128, scale_bits=20),
        WeightFormat("int2", 2, group_size=128, scale_bits=18),
        # bitsandbytes NF4: one fp32 absmax per block of 64.
        WeightFormat("nf4", 4, group_size=64, scale_bits=32),
        # NF4 with double quantisation: 8-bit absmax per block, plus one fp32 per 256 blocks.
        WeightFormat("nf4_dq", 4, group_size=64, scale_bits=8 + 32 / 256),
    )
}

BYTES_PER_VALUE = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}


def weight_format(name: str, group_size: int | None = None, scale_bits: float | None = None) -> WeightFormat:
    """A named format, optionally with another group size or metadata width."""
    if name not in FORMATS:
        raise InvalidArgument(f"unknown format {name!r}; expected one of {sorted(FORMATS)}", field="format")
    fmt = FORMATS[name]
    if group_size is not None:
        if group_size < 1:
            raise InvalidArgument("must be >= 1", field="group_size")
        fmt = replace(fmt, group_size=group_size)
    if scale_bits is not None:
        fmt = replace(fmt, scale_bits=scale_bits)
    return fmt


def weight_bytes(params: int, fmt: str | WeightFormat = "bf16") -> float:
    """Bytes to hold ``params`` weights in a format, metadata included."""
    return (weight_format(fmt) if isinstance(fmt, str) else fmt).weight_bytes(params)


# Each field of ModelShape, and the config keys that name it in the HF model families.
_ALIASES = {
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_heads": ("num_attention_heads", "n_head", "num_heads"),
    "num_kv_heads": ("num_key_value_heads", "num_kv_heads", "n_head_kv"),
    "head_dim": ("head_dim",),
    "intermediate_size": ("intermediate_size", "n_inner", "ffn_dim"),
    "vocab_size": ("vocab_size",),
}


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer that memory depends on."""

    num_layers: int
    hidden_size: int
    num_heads: int
    vocab_size: int
    num_kv_heads: int | None = None
    """Key/value heads (grouped-query attention); defaults to ``num_heads``."""
    head_dim: int | None = None
    """Defaults to ``hidden_size // num_heads``."""
    intermediate_size: int | None = None
    """MLP width; defaults to ``4 * hidden_size``."""
    gated_mlp: bool = True
    """SwiGLU-style MLP with three matrices (Llama) rather than two (GPT-2)."""
    tie_embeddings: bool = False
    """Output projection shares the input embedding matrix."""

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelShape:
        """Read a Hugging Face ``config.json`` (Llama, Mistral, Qwen, GPT-2 style key names)."""
        values = {}
        for name, keys in _ALIASES.items():
            found = next((config[k] for k in keys if config.get(k) is not None), None)
            if found is not None:
                values[name] = int(found)
        for required in ("num_layers", "hidden_size", "num_heads", "vocab_size"):
            if required not in values:
                raise InvalidArgument(f"config has none of {_ALIASES[required]}", field=required)
        gated = config.get("hidden_act", config.get("activation_function")) in ("silu", "swiglu")
        return cls(**values, gated_mlp=gated, tie_embeddings=bool(config.get("tie_word_embeddings", False)))

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def mlp_size(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size

    def param_count(self) -> int:
        """Weights of embeddings, attention, MLP and RMS norms (biases and position tables excluded)."""
        h, d = self.hidden_size, self.dim_per_head
        attention = h * self.num_heads * d * 2 + h * self.kv_heads * d * 2  # q, o and k, v projections
        mlp = (3 if self.gated_mlp else 2) * h * self.mlp_size
        per_layer = attention + mlp + 2 * h  # two norms
        embeddings = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + embeddings + h  # final norm


def kv_cache_bytes_per_token(shape: ModelShape, dtype: str = "bf16") -> int:
    """Bytes of K and V cached per token per sequence: 2 * layers * kv_heads * head_dim * bytes."""
    if dtype not in BYTES_PER_VALUE:
        raise InvalidArgument(f"expected one of {sorted(BYTES_PER_VALUE)}", field="dtype")
    return 2 * shape.num_layers * shape.kv_heads * shape.dim_per_head * BYTES_PER_VALUE[dtype]


def kv_cache_bytes(shape: ModelShape, tokens: int, batch: int = 1, dtype: str = "bf16") -> int:
    """Bytes of KV cache for ``batch`` sequences of ``tokens`` tokens each."""
    return kv_cache_bytes_per_token(shape, dtype) * tokens * batch


# Optimiser state bytes per parameter: AdamW keeps two fp32 moments, its 8-bit variant two bytes,
# SGD with momentum one fp32 buffer.
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw_8bit": 2, "sgd_momentum": 4, "sgd": 0}


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes per device for one training configuration (no sharding)."""

    weights: int
    gradients: int
    optimizer: int
    master_weights: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.master_weights + self.activations


def training_memory(
    shape: ModelShape,
    batch: int,
    seq_len: int,
    precision: str = "bf16_mixed",
    optimizer: str = "adamw",
    checkpointing: bool = False,
    fused_attention: bool = True,
) -> TrainingMemory:
    """Memory to train ``shape`` on ``batch`` sequences of ``seq_len`` tokens on one device.

    ``precision`` is ``fp32`` (weights, gradients and activations in fp32) or ``bf16_mixed``
    (bf16 weights, gradients and activations, fp32 master weights for the optimiser step).
    """
    if precision not in ("fp32", "bf16_mixed"):
        raise InvalidArgument("must be fp32 or bf16_mixed", field="precision")
    if optimizer not in OPTIMIZER_STATE_BYTES:
        raise InvalidArgument(f"expected one of {sorted(OPTIMIZER_STATE_BYTES)}", field="optimizer")
    params = shape.param_count()
    value_bytes = 4 if precision == "fp32" else 2
    return TrainingMemory(
        weights=params * value_bytes,
        gradients=params * value_bytes,
        optimizer=params * OPTIMIZER_STATE_BYTES[optimizer],
        master_weights=params * 4 if precision == "bf16_mixed" else 0,
        activations=activation_bytes(shape, batch, seq_len, value_bytes, checkpointing, fused_attention),
    )


def activation_bytes(
    shape: ModelShape, batch: int, seq_len: int, value_bytes: int, checkpointing: bool, fused_attention: bool
) -> int:
    """Activations kept for the backward pass, plus the fp32 logits of the loss.

    Per layer (Korthikanti et al. 2022, written for 2-byte values): ``s b h (34 + 5 a s / h)``;
    scaled by ``value_bytes / 2`` for other widths.
    """
    s, b, h, a = seq_len, batch, shape.hidden_size, shape.num_heads
    if checkpointing:
        per_layer = 2 * s * b * h  # only each layer's input is kept; the rest is recomputed
    else:
        scores = 0 if fused_attention else 5 * a * s * s * b  # softmax input/output and dropout mask
        per_layer = 34 * s * b * h + scores
    logits = 4 * s * b * shape.vocab_size
    return int(shape.num_layers * per_layer * value_bytes / 2) + logits
