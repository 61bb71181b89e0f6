"""The memory and compute planners (libs/common/planning) as answers of the platform API."""

from __future__ import annotations

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


def plan_memory(preset: str, config: dict[str, Any] | None, tokens: int, batch: int) -> dict[str, Any]:
    if config is not None:
        shape = ModelShape.from_hf_config(config)
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
    rows = []
    for row in compute_plan(flops, tokens_per_param):
        a = row.allocation
        rows.append(
            {
                "method": row.method,
                "parameters": a.params,
                "tokens": a.tokens,
                "tokens_per_param": a.tokens_per_param,
                "predicted_loss": row.predicted_loss,
            }
        )
    return {"rows": rows}
