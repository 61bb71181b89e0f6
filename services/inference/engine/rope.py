"""RoPE scaling chosen at load time, to serve a model past the context it was trained on.

    load_model("models/llama/1", store, rope_scaling={"rope_type": "yarn", "factor": 4.0})

The spec becomes the config's `rope_parameters` before `transformers` builds the model, so the
rotary embedding that runs is theirs: "linear" divides positions by the factor, "dynamic" (NTK)
raises the base once a sequence passes the trained length, "yarn" mixes interpolated and original
frequencies and rescales attention. `config.max_position_embeddings` keeps the trained length
(dynamic NTK and YaRN read it as such); the served context, trained length times the factor, is
returned and becomes the engine's limit.

Dynamic NTK in a packed step rescales by the longest position in the step, as `transformers` does
by the longest in its batch; keys already cached keep the frequencies they were computed with.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import PretrainedConfig

from libs.common.errors import InvalidArgument

ROPE_TYPES = ("linear", "dynamic", "yarn")


def apply_rope_scaling(config: PretrainedConfig, spec: Mapping[str, Any]) -> int:
    """Set `spec` ({"rope_type", "factor", ...extra parameters}) on the config; returns the context in tokens."""
    base = getattr(config, "rope_parameters", None)
    if not base:
        raise InvalidArgument(f"{config.model_type} has no rotary position embeddings to scale", field="rope_scaling")
    if base.get("rope_type", "default") != "default":
        raise InvalidArgument(f"the model already uses {base['rope_type']!r} RoPE scaling", field="rope_scaling")
    if not isinstance(spec, Mapping):
        raise InvalidArgument(f'must be {{"rope_type": ..., "factor": ...}} (got {spec!r})', field="rope_scaling")
    rope_type, factor = spec.get("rope_type"), spec.get("factor")
    if rope_type not in ROPE_TYPES:
        raise InvalidArgument(
            f"rope_type must be one of {', '.join(ROPE_TYPES)} (got {rope_type!r})", field="rope_scaling"
        )
    if isinstance(factor, bool) or not isinstance(factor, int | float) or not factor >= 1:
        raise InvalidArgument(f"factor must be a number >= 1 (got {factor!r})", field="rope_scaling")
    params = {**base, **spec, "factor": float(factor)}
    if rope_type == "yarn":
        params.setdefault("original_max_position_embeddings", config.max_position_embeddings)
    config.rope_parameters = params
    try:
        config.validate_rope()
    except (KeyError, TypeError, ValueError) as e:
        config.rope_parameters = base
        raise InvalidArgument(f"not valid for {rope_type!r}: {e}", field="rope_scaling") from None
    trained = params.get("original_max_position_embeddings", config.max_position_embeddings)
    return int(trained * factor)
