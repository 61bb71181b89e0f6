"""Quantised replicas: weight-only INT8 / INT4 linear layers, applied at load time or loaded pre-quantised.

A quantiser (plugin kind "quantizers", entry-point group `llmp.quantizers`) swaps a model's linear
layers (`nn.Linear`, and GPT-2's `Conv1D`) for quantised ones in place; embeddings and the output
head stay in full precision unless `lm_head=True`. Activations are not quantised.

- "int8": symmetric, one scale per group of `group_size` input features (default: the whole row,
  i.e. per output channel). Per-channel layers run `torch._weight_int8pack_mm`.
- "int4": asymmetric, a scale and a zero per group of `group_size` (default 64) input features,
  w = (q - 8) * scale + zero with q in [0, 15]. Runs `aten._weight_int4pack_mm_for_cpu` on weights
  repacked by `aten._convert_weight_to_int4pack_for_cpu`.
- "nf4": bitsandbytes' NF4, only where a CUDA GPU and bitsandbytes are present.

The CPU kernels take bfloat16 activations (their float32 paths are not vectorised and run slower
than a dense float32 matmul), so a quantised layer computes in bfloat16 and returns the input's
dtype; scales are stored in bfloat16 for the same reason. Where a kernel does not apply (another
device, group-wise INT8, shapes the kernel refuses) the layer dequantises its weight and runs a
dense matmul; `QuantizationReport.kernels` says which path each layer took.

Pre-quantised files: `save_quantized` writes `config.json`, `model.safetensors` (int8 weights, or
int4 as two values per byte, low nibble first, plus bfloat16 scales) and `quantization.json`
(the quantiser's spec); `load_quantized` rebuilds the model from them. Never a pickle.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.initialization import no_init_weights
from transformers.pytorch_utils import Conv1D

from libs.common.errors import FailedPrecondition, InvalidArgument
from libs.common.plugins import Registry

log = logging.getLogger(__name__)

QUANTIZATION_FILE = "quantization.json"
WEIGHTS_FILE = "model.safetensors"
SCALE_DTYPE = torch.bfloat16
KERNEL_DTYPE = torch.bfloat16
DEQUANTIZE = "dequantize+matmul"
INT8_KERNEL = "aten._weight_int8pack_mm"
INT4_KERNEL = "aten._weight_int4pack_mm_for_cpu"
INT4_KERNEL_GROUPS = (32, 64, 128, 256)


# -- quantised layers ---------------------------------------------------------------------------------
class QuantizedLinear(nn.Module):
    """y = x W^T + b with W [out, in] stored quantised; `kernel` names the matmul that runs."""

    fits_kernel: bool
    """Whether the shape and grouping suit this format's CPU kernel."""
    kernel_name: str

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"group_size {group_size} does not divide {in_features} input features")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def num_groups(self) -> int:
        return self.in_features // self.group_size

    @property
    def num_weights(self) -> int:
        return self.in_features * self.out_features

    @property
    def kernel(self) -> str:
        """The matmul this layer runs: the packed CPU kernel where it applies, else dequantise + matmul."""
        on_cpu = next(self.buffers()).device.type == "cpu"
        return self.kernel_name if self.fits_kernel and on_cpu else DEQUANTIZE

    def quantized_bytes(self) -> int:
        """Bytes of the quantised weight and its scales (and zeros), bias excluded."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def dequantize(self) -> torch.Tensor:
        """W [out, in] in float32."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, group_size={self.group_size}, kernel={self.kernel}"

    def _finish(self, y: torch.Tensor, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
        y = y.to(dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Int8Linear(QuantizedLinear):
    """qweight int8 [out, in]; scales [out, groups] bfloat16; w = q * scale."""

    qweight: torch.Tensor
    scales: torch.Tensor

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: torch.Tensor | None) -> None:
        super().__init__(in_features, out_features, group_size, bias)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, self.num_groups, dtype=SCALE_DTYPE))
        # The int8 kernel takes one scale per output channel; its K must be a multiple of 16.
        self.fits_kernel, self.kernel_name = self.num_groups == 1 and in_features % 16 == 0, INT8_KERNEL

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int) -> Int8Linear:
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, group_size, bias).to(weight.device)
        groups = weight.float().reshape(out_features, -1, group_size)  # [out, G, gs]
        scales = (groups.abs().amax(-1) / 127).clamp(min=1e-12).to(SCALE_DTYPE)  # [out, G]
        q = torch.round(groups / scales.float()[..., None]).clamp(-127, 127)
        layer.qweight.copy_(q.reshape(out_features, in_features))
        layer.scales.copy_(scales)
        return layer

    @classmethod
    def fuse(cls, layers: list[Int8Linear]) -> Int8Linear | None:
        """One layer computing `layers` side by side (outputs concatenated), for one matmul where there were several.

        Only per-channel layers on the int8 kernel of one input size fuse; None otherwise. The fused
        tensors hold the weights once: each layer's qweight, scales and bias become row views of them,
        so no memory is added and each layer still computes what it did.
        """
        first = layers[0]
        fusable = all(
            layer.kernel == INT8_KERNEL and layer.in_features == first.in_features and layer.num_groups == 1
            for layer in layers
        )
        with_bias = [layer.bias is not None for layer in layers]
        if not fusable or (any(with_bias) and not all(with_bias)):
            return None
        bias = torch.cat([layer.bias.detach() for layer in layers]) if all(with_bias) else None  # type: ignore[union-attr]
        fused = cls(first.in_features, sum(layer.out_features for layer in layers), first.in_features, bias)
        fused.qweight = torch.cat([layer.qweight for layer in layers])
        fused.scales = torch.cat([layer.scales for layer in layers])
        start = 0
        for layer in layers:
            rows = slice(start, start + layer.out_features)
            layer.qweight, layer.scales = fused.qweight[rows], fused.scales[rows]
            if fused.bias is not None:
                layer.bias.data = fused.bias.data[rows]  # type: ignore[union-attr]
            start = rows.stop
        return fused

    def dequantize(self) -> torch.Tensor:
        groups = self.qweight.reshape(self.out_features, self.num_groups, self.group_size).float()
        return (groups * self.scales.float()[..., None]).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # [M, in]
        if self.kernel == INT8_KERNEL:
            y = torch._weight_int8pack_mm(x2.to(KERNEL_DTYPE).contiguous(), self.qweight, self.scales[:, 0])
        else:
            y = F.linear(x2, self.dequantize().to(x.dtype))
        return self._finish(y, x.dtype, x.shape)


class Int4Linear(QuantizedLinear):
    """qweight uint8 [out, in / 2], two 4-bit values per byte; scales_and_zeros [groups, out, 2] bfloat16.

    Where the kernel fits, `qweight` holds its packed layout (same shape, same bytes, on any device); the
    state dict always holds the portable layout (element 2i in the low nibble of byte i, 2i+1 in the
    high one), so files do not depend on the kernel's internals.
    """

    qweight: torch.Tensor
    scales_and_zeros: torch.Tensor

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: torch.Tensor | None) -> None:
        super().__init__(in_features, out_features, group_size, bias)
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros", torch.zeros(self.num_groups, out_features, 2, dtype=SCALE_DTYPE))
        # The kernel's packer needs out % 16 == 0 and its group sizes are fixed.
        self.fits_kernel = out_features % 16 == 0 and group_size in INT4_KERNEL_GROUPS
        self.kernel_name = INT4_KERNEL

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int) -> Int4Linear:
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, group_size, bias).to(weight.device)
        groups = weight.float().reshape(out_features, -1, group_size)  # [out, G, gs]
        low, high = groups.amin(-1), groups.amax(-1)  # [out, G]
        scales = ((high - low) / 15).clamp(min=1e-12).to(SCALE_DTYPE)
        zeros = (low + 8 * scales.float()).to(SCALE_DTYPE)  # the value of q = 8
        q = torch.round((groups - zeros.float()[..., None]) / scales.float()[..., None] + 8).clamp(0, 15)
        layer.scales_and_zeros.copy_(torch.stack([scales, zeros], -1).transpose(0, 1))
        layer.qweight.copy_(layer._to_storage(q.reshape(out_features, in_features).to(torch.uint8)))
        return layer

    def _unpacked(self) -> torch.Tensor:
        """q uint8 [out, in] in [0, 15]."""
        if self.fits_kernel:
            return unpack_int4_kernel_layout(self.qweight, self.in_features)
        return torch.stack([self.qweight & 15, self.qweight >> 4], -1).reshape(self.out_features, self.in_features)

    def _to_storage(self, q: torch.Tensor) -> torch.Tensor:
        """q uint8 [out, in] -> qweight in this layer's layout."""
        if self.fits_kernel:
            return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).cpu(), 1).to(q.device)
        return q[:, 0::2] | (q[:, 1::2] << 4)

    def dequantize(self) -> torch.Tensor:
        q = self._unpacked().reshape(self.out_features, self.num_groups, self.group_size).float()
        scales, zeros = self.scales_and_zeros.float().transpose(0, 1).unbind(-1)  # [out, G] each
        return ((q - 8) * scales[..., None] + zeros[..., None]).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # [M, in]
        if self.kernel == INT4_KERNEL:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2.to(KERNEL_DTYPE).contiguous(), self.qweight, self.group_size, self.scales_and_zeros
            )
        else:
            y = F.linear(x2, self.dequantize().to(x.dtype))
        return self._finish(y, x.dtype, x.shape)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        q = self._unpacked()
        destination[prefix + "qweight"] = q[:, 0::2] | (q[:, 1::2] << 4)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        portable = self.qweight
        q = torch.stack([portable & 15, portable >> 4], -1).reshape(self.out_features, self.in_features)
        self.qweight.copy_(self._to_storage(q))


def unpack_int4_kernel_layout(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Invert `_convert_weight_to_int4pack_for_cpu`: packed uint8 [out, in / 2] -> q uint8 [out, in].

    The packer only moves nibbles, so packing the digits (base 16) of every element's index and
    reading where each digit landed recovers the permutation, whatever layout this torch build uses.
    """
    out_features = packed.shape[0]
    count = out_features * in_features
    index = torch.arange(count)
    source = torch.zeros(count, dtype=torch.long)  # source[nibble slot] = element index stored there
    for digit in range(max(1, math.ceil(math.log2(count) / 4))):
        digits = ((index >> (4 * digit)) & 15).reshape(out_features, in_features).to(torch.int32)
        moved = torch.ops.aten._convert_weight_to_int4pack_for_cpu(digits, 1)
        source |= _nibbles(moved).long() << (4 * digit)
    q = torch.empty(count, dtype=torch.uint8)
    q[source] = _nibbles(packed.cpu())
    return q.reshape(out_features, in_features).to(packed.device)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [...] -> the low and high nibble of every byte, in order: uint8 [2 * numel]."""
    return torch.stack([packed & 15, packed >> 4], -1).flatten()


# -- quantisers (plugins) -----------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantizationReport:
    """What a quantiser did to a replica; sizes count weights and scales, in bytes."""

    spec: Mapping[str, Any]
    """The quantiser's plugin spec, as written to quantization.json."""
    num_parameters: int
    """Parameters of the full-precision model (a quantised weight counts its elements)."""
    model_bytes: int
    """Bytes of every parameter and persistent buffer after quantisation."""
    num_quantized_weights: int
    quantized_bytes: int
    """Bytes of the quantised layers' weights with their scales and zeros."""
    kernels: Mapping[str, int]
    """Matmul used -> number of layers using it."""

    @property
    def bytes_per_parameter(self) -> float:
        """Of the quantised layers: the format's own cost (1 + scales for INT8, 0.5 + scales for INT4)."""
        return self.quantized_bytes / max(1, self.num_quantized_weights)

    @property
    def model_bytes_per_parameter(self) -> float:
        """Of the whole replica, full-precision embeddings and norms included."""
        return self.model_bytes / max(1, self.num_parameters)


class Quantizer:
    """Swaps a model's linear layers for quantised ones, in place."""

    name = ""

    def __init__(self, group_size: int | None = None, lm_head: bool = False) -> None:
        if group_size is not None and group_size < 1:
            raise ValueError("group_size must be >= 1")
        self.group_size = group_size
        self.lm_head = lm_head

    def spec(self) -> dict[str, Any]:
        return {"type": self.name, "group_size": self.group_size, "lm_head": self.lm_head}

    def quantize_layer(self, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        """weight [out, in] -> the quantised layer computing x W^T + b."""
        raise NotImplementedError

    def empty_layer(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> nn.Module:
        """A quantised layer of that shape to load a pre-quantised state into."""
        raise NotImplementedError

    def quantize(self, model: PreTrainedModel) -> QuantizationReport:
        for name, layer in self.targets(model):
            weight, bias = linear_weight(layer)
            _replace(model, name, self.quantize_layer(weight, bias))
        return self.report(model)

    def prepare(self, model: PreTrainedModel) -> None:
        """Give the model the quantised layers' shapes, for `load_state_dict` of pre-quantised weights."""
        for name, layer in self.targets(model):
            weight, bias = linear_weight(layer)
            _replace(model, name, self.empty_layer(weight.shape[1], weight.shape[0], bias))

    def targets(self, model: PreTrainedModel) -> list[tuple[str, nn.Module]]:
        """The linear layers to quantise: all but the output head (unless lm_head) and unfit shapes."""
        head = model.get_output_embeddings()
        found: list[tuple[str, nn.Module]] = []
        for name, module in model.named_modules():
            if not isinstance(module, nn.Linear | Conv1D) or (module is head and not self.lm_head):
                continue
            in_features = linear_weight(module)[0].shape[1]
            if in_features % (self.group_size or in_features):
                log.warning(
                    "%s: group_size %s does not divide %d; left unquantised", name, self.group_size, in_features
                )
                continue
            found.append((name, module))
        return found

    def report(self, model: PreTrainedModel) -> QuantizationReport:
        layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
        quantized = {id(b) for m in layers for b in m.buffers()}
        dense = [t for t in (*model.parameters(), *persistent_buffers(model)) if id(t) not in quantized]
        return QuantizationReport(
            spec=self.spec(),
            num_parameters=sum(t.numel() for t in model.parameters()) + sum(m.num_weights for m in layers),
            model_bytes=sum(t.numel() * t.element_size() for t in dense) + sum(m.quantized_bytes() for m in layers),
            num_quantized_weights=sum(m.num_weights for m in layers),
            quantized_bytes=sum(m.quantized_bytes() for m in layers),
            kernels=dict(Counter(m.kernel for m in layers)),
        )


class Int8WeightOnly(Quantizer):
    name = "int8"

    def quantize_layer(self, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        return Int8Linear.from_float(weight, bias, self.group_size or weight.shape[1])

    def empty_layer(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> nn.Module:
        return Int8Linear(in_features, out_features, self.group_size or in_features, bias)


class Int4WeightOnly(Quantizer):
    name = "int4"

    def __init__(self, group_size: int = 64, lm_head: bool = False) -> None:
        if group_size % 2:
            raise ValueError("group_size must be even (two values per byte)")
        super().__init__(group_size, lm_head)

    def quantize_layer(self, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        return Int4Linear.from_float(weight, bias, self.group_size or weight.shape[1])

    def empty_layer(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> nn.Module:
        return Int4Linear(in_features, out_features, self.group_size or in_features, bias)


class Nf4Bitsandbytes(Quantizer):
    """bitsandbytes' 4-bit NormalFloat with blocks of 64; GPU only, not saved pre-quantised."""

    name = "nf4"

    def __init__(self, lm_head: bool = False, compute_dtype: str = "bfloat16") -> None:
        super().__init__(None, lm_head)
        self.compute_dtype = getattr(torch, compute_dtype)

    def spec(self) -> dict[str, Any]:
        return {"type": self.name, "lm_head": self.lm_head, "compute_dtype": str(self.compute_dtype).split(".")[-1]}

    def quantize(self, model: PreTrainedModel) -> QuantizationReport:
        if not torch.cuda.is_available():
            raise FailedPrecondition("nf4 quantisation needs a CUDA GPU; this replica has none", field="quantization")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise FailedPrecondition("nf4 quantisation needs bitsandbytes installed", field="quantization") from None
        for name, layer in self.targets(model):
            weight, bias = linear_weight(layer)
            new = bnb.nn.Linear4bit(
                weight.shape[1], weight.shape[0], bias is not None, compute_dtype=self.compute_dtype, quant_type="nf4"
            )
            new.weight = bnb.nn.Params4bit(weight.detach().cpu(), requires_grad=False, quant_type="nf4")
            if bias is not None:
                new.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
            _replace(model, name, new.to("cuda"))
        packed = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        weights = sum(2 * m.weight.numel() for m in packed)  # uint8 storage, two values per byte
        absmax = sum(m.weight.quant_state.absmax.numel() * 4 for m in packed)  # float32 per block of 64
        dense = [p for p in model.parameters() if not isinstance(p, bnb.nn.Params4bit)]
        dense_bytes = sum(p.numel() * p.element_size() for p in dense)
        return QuantizationReport(
            spec=self.spec(),
            num_parameters=sum(p.numel() for p in dense) + weights,
            model_bytes=dense_bytes + weights // 2 + absmax,
            num_quantized_weights=weights,
            quantized_bytes=weights // 2 + absmax,
            kernels={"bitsandbytes": len(packed)},
        )

    def prepare(self, model: PreTrainedModel) -> None:
        raise FailedPrecondition("nf4 replicas are quantised at load time, not loaded pre-quantised")


QUANTIZERS: Registry[Quantizer] = Registry(
    "quantizers",
    {
        "int8": f"{__name__}:Int8WeightOnly",
        "int4": f"{__name__}:Int4WeightOnly",
        "nf4": f"{__name__}:Nf4Bitsandbytes",
    },
    base=Quantizer,
)


# -- model surgery and files --------------------------------------------------------------------------
def linear_weight(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W [out, in], b [out] or None) of an nn.Linear or a GPT-2 Conv1D (which stores W^T)."""
    weight, bias = cast(torch.Tensor, layer.weight), cast(torch.Tensor | None, layer.bias)
    return (weight.t() if isinstance(layer, Conv1D) else weight).detach(), bias


def persistent_buffers(model: nn.Module) -> list[torch.Tensor]:
    return [
        b for m in model.modules() for n, b in m.named_buffers(recurse=False) if n not in m._non_persistent_buffers_set
    ]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize(model: PreTrainedModel, spec: Mapping[str, Any] | str) -> QuantizationReport:
    """Quantise a loaded model in place by plugin spec, e.g. {"type": "int4", "group_size": 64}."""
    report = QUANTIZERS.create(spec, field="quantization").quantize(model)
    log.info("quantised %s: %.3f bytes/parameter, kernels %s", report.spec, report.bytes_per_parameter, report.kernels)
    return report


def save_quantized(model: PreTrainedModel, report: QuantizationReport, directory: Path) -> None:
    """Write a model quantised as `report` says: config.json + model.safetensors + quantization.json."""
    directory.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(directory / "config.json")
    safetensors.torch.save_model(model, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / QUANTIZATION_FILE).write_text(json.dumps(dict(report.spec), indent=2))


def is_prequantized(directory: Path) -> bool:
    return (directory / QUANTIZATION_FILE).is_file()


def load_quantized(
    directory: Path, config: PretrainedConfig, *, dtype: torch.dtype, device: str | torch.device
) -> tuple[PreTrainedModel, QuantizationReport]:
    """Rebuild a model saved by `save_quantized`; every tensor must match its shape, none may be missing."""
    try:
        spec = json.loads((directory / QUANTIZATION_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidArgument(f"{QUANTIZATION_FILE} is not readable JSON: {e}", field="model") from None
    quantizer = QUANTIZERS.create(spec, field="quantization")
    with no_init_weights():  # every tensor is read from the file below
        model: Any = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    quantizer.prepare(model)
    try:
        safetensors.torch.load_model(model, str(directory / WEIGHTS_FILE), strict=True)
    except (RuntimeError, OSError) as e:
        raise InvalidArgument(f"pre-quantised weights do not match the model: {e}", field="model") from None
    model.to(device).eval().requires_grad_(False)
    return model, quantizer.report(model)
