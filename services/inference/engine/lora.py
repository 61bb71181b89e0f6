"""LoRA adapters (peft's format) served over one base model, chosen per request, loaded at run time.

An adapter is a folder inside the artifact store holding `adapter_config.json` and
`adapter_model.safetensors`, as peft's `save_pretrained` writes them: for each targeted layer a
down-projection A [r, in] and an up-projection B [out, r], scaled by lora_alpha / r (or / sqrt(r)
with rsLoRA). The base weights are never changed: each targeted layer gets one forward hook,
installed when the first adapter that targets it is loaded, which adds scale * B(A(x)) to the
output rows of the tokens whose request uses that adapter. A step declares the adapter of every
packed token (`LoraAdapters.step`), so requests with different adapters, or none, share a batch.
Called outside a step (e.g. by `generate`) the hooks add nothing.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from libs.common.artifacts import ArtifactStore
from libs.common.errors import InvalidArgument, NotFound

_PREFIX = "base_model.model."
_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


@dataclass(frozen=True)
class LoraAdapter:
    name: str
    key: bytes
    """Unique per load: salts the prefix cache, so a reloaded name never reuses stale blocks."""
    scale: float
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """Module path in the base model -> (A [r, in], B [out, r])."""


def adapter_dir(location: str | Path, store: ArtifactStore) -> Path:
    """A store-relative id, or an absolute path inside the store's root, -> a peft adapter folder."""
    path = Path(location)
    resolved = path.resolve() if path.is_absolute() else store.path(location, field="adapter")
    if not resolved.is_relative_to(store.root):
        raise InvalidArgument(f"{str(location)!r} is outside the artifact store", field="adapter")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        file = resolved / name
        if not file.is_file() or not file.resolve().is_relative_to(store.root):
            raise NotFound(f"no peft adapter ({name}) at {str(location)!r}", field="adapter")
    return resolved


def read_config(directory: Path) -> dict[str, Any]:
    """adapter_config.json, refused unless it is plain LoRA that adds to Linear outputs."""
    config = json.loads((directory / "adapter_config.json").read_text())
    unsupported = [
        (config.get("peft_type") != "LORA", f"peft_type {config.get('peft_type')!r} is not LORA"),
        (not isinstance(config.get("r"), int) or config["r"] < 1, f"rank r {config.get('r')!r} is not an int >= 1"),
        (config.get("use_dora", False), "DoRA is not supported"),
        (config.get("bias", "none") != "none", "trained biases are not supported"),
        (bool(config.get("modules_to_save")), "modules_to_save is not supported"),
        (bool(config.get("rank_pattern") or config.get("alpha_pattern")), "per-layer ranks are not supported"),
    ]
    for bad, message in unsupported:
        if bad:
            raise InvalidArgument(message, field="adapter")
    return config


class LoraAdapters:
    """The adapters loaded over one model, and the hooks that apply them per token."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.adapters: dict[str, LoraAdapter] = {}
        self._hooked: set[str] = set()
        self._loads = itertools.count()
        self._groups: list[tuple[LoraAdapter, torch.Tensor]] = []  # this step: adapter, its token rows [t]
        param = next(model.parameters())
        self._dtype, self._device = param.dtype, param.device

    def __contains__(self, name: object) -> bool:
        return name in self.adapters

    def load(self, name: str, directory: Path) -> LoraAdapter:
        if not name:
            raise InvalidArgument("must not be empty", field="adapter")
        if name in self.adapters:
            raise InvalidArgument(f"{name!r} is already loaded; unload it first", field="adapter")
        config = read_config(directory)
        r, alpha = config["r"], config["lora_alpha"]
        scale = alpha / r**0.5 if config.get("use_rslora", False) else alpha / r
        adapter = LoraAdapter(name, f"lora:{name}#{next(self._loads)}".encode(), scale, self._read_layers(directory))
        for path in adapter.layers.keys() - self._hooked:
            self.model.get_submodule(path).register_forward_hook(self._hook(path))
            self._hooked.add(path)
        self.adapters[name] = adapter
        return adapter

    def unload(self, name: str) -> None:
        """Forget the adapter; its layers' hooks stay and add nothing for it."""
        if self.adapters.pop(name, None) is None:
            raise NotFound(f"no adapter {name!r} is loaded", field="adapter")

    def _read_layers(self, directory: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        weights = load_file(directory / "adapter_model.safetensors")
        layers = {}
        for key in weights:
            if not (key.startswith(_PREFIX) and key.endswith(_SUFFIXES)):
                raise InvalidArgument(f"unexpected weight {key!r}", field="adapter")
            if key.endswith(_SUFFIXES[1]):  # read with its lora_A
                continue
            path = key[len(_PREFIX) : -len(_SUFFIXES[0])]
            try:
                layer = self.model.get_submodule(path)
            except AttributeError:
                raise InvalidArgument(f"the model has no layer {path!r}", field="adapter") from None
            a = weights[key].to(self._device, self._dtype)  # [r, in]
            b = weights[key[: -len(_SUFFIXES[0])] + _SUFFIXES[1]].to(self._device, self._dtype)  # [out, r]
            if not isinstance(layer, torch.nn.Linear) or (b.shape[0], a.shape[1]) != layer.weight.shape:
                raise InvalidArgument(f"{path!r} does not match a Linear layer of the model", field="adapter")
            layers[path] = (a, b)
        return layers

    @contextmanager
    def step(self, token_adapters: list[str | None]) -> Iterator[None]:
        """Within the block, the model's packed tokens use these adapters (None: the base model)."""
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(token_adapters):
            if name is not None:
                rows.setdefault(name, []).append(i)
        self._groups = [
            (self.adapters[n], torch.tensor(ix, device=self._device)) for n, ix in rows.items() if n in self.adapters
        ]
        try:
            yield
        finally:
            self._groups = []

    def _hook(self, path: str) -> Any:
        def add_deltas(module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            """args[0] [1, N, in], output [1, N, out] of a packed step."""
            if not self._groups:
                return output
            x, out = args[0][0], output[0].clone()  # [N, in], [N, out]
            for adapter, rows in self._groups:
                if path in adapter.layers:
                    a, b = adapter.layers[path]
                    out[rows] += (x[rows] @ a.T) @ b.T * adapter.scale  # [t, r] -> [t, out]
            return out.unsqueeze(0)

        return add_deltas
