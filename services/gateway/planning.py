"""The memory and compute planners (libs/common/planning) as answers of the platform API."""

from __future__ import annotations

import math
from typing import Any

from libs.common.errors import InvalidArgument
from libs.common.planning.memory import (
    FORMATS,
    ModelShape,
    kv_cache_bytes,
    kv_cache_bytes_per_token,
    training_memory,
)
from libs.common.planning.scaling import compute_plan
from libs.common.planning.seed_check import LLAMA_2_7B, LLAMA_3_8B, LLAMA_70B

PRESETS = {"llama-2-7b": LLAMA_2_7B, "llama-3-8b": LLAMA_3_8B, "llama-70b": LLAMA_70B}

KV_DTYPES = ("fp32", "bf16", "fp8")


def shape_of(config: dict[str, Any]) -> ModelShape:
    """A config.json's shape, refused (naming `config`) unless its sizes are positive whole numbers."""
    try:
        shape = ModelShape.from_hf_config(config)
    except (TypeError, ValueError, OverflowError) as e:
        raise InvalidArgument(f"not a usable config.json: {e}", field="config") from None
    sizes = [shape.num_layers, shape.hidden_size, shape.num_heads, shape.vocab_size, shape.kv_heads, shape.mlp_size]
    if not all(0 < s < 1 << 40 for s in sizes) or shape.dim_per_head <= 0:
        raise InvalidArgument("layers, sizes and head counts must be positive", field="config")
    return shape


def plan_memory(preset: str, config: dict[str, Any] | None, tokens: int, batch: int) -> dict[str, Any]:
    if config is not None:
        shape = shape_of(config)
    elif preset in PRESETS:
        shape = PRESETS[preset]
    else:
        raise InvalidArgument(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}", field="preset")
    params = shape.param_count()
    return {
        "parameters": params,
        "weights": [
            {"format": f.name, "bits_per_weight": f.bits_per_weight(), "bytes": int(f.weight_bytes(params))}
            for f in FORMATS.values()
        ],
        "kv_bytes_per_token": {d: kv_cache_bytes_per_token(shape, d) for d in KV_DTYPES},
        "kv_bytes": {d: kv_cache_bytes(shape, tokens, batch, d) for d in KV_DTYPES},
        "training_bytes": training_memory(shape, batch=batch, seq_len=tokens).total,
    }


def plan_compute(flops: float, tokens_per_param: float) -> dict[str, Any]:
    if not 1 <= flops <= 1e40:
        raise InvalidArgument("must be in [1, 1e40] FLOPs", field="flops")
    if not 1e-3 <= tokens_per_param <= 1e6:
        raise InvalidArgument("must be in [0.001, 1e6]", field="tokens_per_param")
    rows = []
    for row in compute_plan(flops, tokens_per_param):
        a = row.allocation
        loss = row.predicted_loss if row.predicted_loss is None or math.isfinite(row.predicted_loss) else None
        rows.append({"method": row.method, "parameters": a.params, "tokens": a.tokens,
                     "tokens_per_param": a.tokens_per_param, "predicted_loss": loss})  # fmt: skip
    return {"rows": rows}
