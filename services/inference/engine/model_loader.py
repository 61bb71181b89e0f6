"""Load a causal language model from a directory of HF `config.json` + `*.safetensors`.

The model is built by `transformers` from its config, with remote code refused, and filled from
safetensors files only (never a pickle); `transformers` also maps renamed checkpoint keys (e.g.
GPT-NeoX's `embed_out`) and ties shared weights. Any weight missing, unexpected or of the wrong
shape is an error rather than a silently random tensor. Locations are either ids relative
to the artifact store or absolute paths that must resolve inside the store's root; a symlink
that leads out of the root is refused like a `..` would be. RoPE scaling, when asked for, is set
on the config before the model is built (rope.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from libs.common.artifacts import ArtifactStore
from libs.common.errors import InvalidArgument, NotFound
from services.inference.engine.quantization import QuantizationReport, is_prequantized, load_quantized, quantize
from services.inference.engine.rope import apply_rope_scaling

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "gpt2", "gpt_neox")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for inference, with where it came from."""

    module: PreTrainedModel
    config: PretrainedConfig
    path: Path
    quantization: QuantizationReport | None = None
    """Set for a quantised replica: its method, kernels and bytes per parameter."""
    max_model_len: int | None = None
    """Context in tokens when RoPE scaling extends it past the config's max_position_embeddings."""

    @property
    def num_parameters(self) -> int:
        if self.quantization is not None:
            return self.quantization.num_parameters
        return sum(p.numel() for p in self.module.parameters())


def model_dir(location: str | Path, store: ArtifactStore, *, field: str = "model") -> Path:
    """A store-relative id, or an absolute path inside the store's root, -> an existing directory."""
    path = Path(location)
    if path.is_absolute():
        resolved = path.resolve()
        if not resolved.is_relative_to(store.root):
            raise InvalidArgument(f"{str(location)!r} is outside the artifact store", field=field)
    else:
        resolved = store.path(location, field=field)
    if not (resolved / "config.json").is_file():
        raise NotFound(f"no model (config.json) at {str(location)!r}", field=field)
    return resolved


def read_config(directory: Path, *, field: str = "model") -> PretrainedConfig:
    try:
        raw = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidArgument(f"config.json is not readable JSON: {e}", field=field) from None
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InvalidArgument(
            f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}",
            field=field,
        )
    return AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)


def check_weight_files(directory: Path, root: Path, *, field: str = "model") -> None:
    """Safetensors weights must exist and none may be a symlink out of the store."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise NotFound(f"no *.safetensors weights in {directory.name!r}", field=field)
    for f in files:
        if not f.resolve().is_relative_to(root):
            raise InvalidArgument(f"{f.name} leads outside the artifact store", field=field)


def load_model(
    location: str | Path,
    store: ArtifactStore,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    quantization: Mapping[str, Any] | str | None = None,
    rope_scaling: Mapping[str, Any] | None = None,
) -> LoadedModel:
    """Build the model from its config and load its safetensors weights; eval mode, no grad.

    `quantization` is a quantizer spec applied after loading; a directory saved pre-quantised
    (quantization.json) is loaded as it is, and takes no spec. `rope_scaling` is
    {"rope_type": "linear" | "dynamic" | "yarn", "factor": f, ...}; it extends the context by f.
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise InvalidArgument(f"unknown dtype {dtype!r}; one of {', '.join(DTYPES)}", field="dtype")
        dtype = DTYPES[dtype]
    directory = model_dir(location, store)
    config = read_config(directory)
    check_weight_files(directory, store.root)
    context = apply_rope_scaling(config, rope_scaling) if rope_scaling is not None else None
    if is_prequantized(directory):
        if quantization is not None:
            raise InvalidArgument("the model is stored pre-quantised; omit it", field="quantization")
        module, prequantized = load_quantized(directory, config, dtype=dtype, device=device)
        return LoadedModel(module, config, directory, prequantized, context)
    loaded: Any = AutoModelForCausalLM.from_pretrained(
        directory,
        config=config,
        dtype=dtype,
        device_map=str(device),
        local_files_only=True,
        trust_remote_code=False,
        use_safetensors=True,
        output_loading_info=True,
    )
    module, info = loaded
    problems = {k: sorted(map(str, v))[:5] for k, v in info.items() if k != "error_msgs" and v}
    if problems:
        raise InvalidArgument(f"weights do not match config.json: {problems}", field="model")
    module.eval().requires_grad_(False)
    report = quantize(module, quantization) if quantization is not None else None
    return LoadedModel(module, config, directory, report, context)
