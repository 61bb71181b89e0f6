"""The engine's own pass over Llama-style decoder layers (Llama, Mistral): fewer, larger operations per layer.

A decode step of a small batch is mostly fixed cost per operation: `transformers`' modules spend
about a hundred tensor operations per layer (separate q/k/v and gate/up projections, layout
changes, the attention interface), each paying dispatch and a cache refill after the large
matmul before it. This pass runs the same layers with their own weights and modules (norms,
rotary embeddings with any RoPE scaling, activation, output projections) but

- one matmul for q, k and v, and one for gate and up: at construction the projections' weights
  (float, or INT8 on its per-channel kernel) are moved into one tensor per layer and the modules
  keep views of it, so no memory is added and the modules still compute exactly what they did;
- tokens stay packed as [N, ...] rows from the embeddings to the last norm, q and k are rotated
  together, Llama's float32 RMSNorm is one call, and attention reads and writes the paged cache
  directly (model_runner.attend).

Projections that cannot share a matmul (INT4's packed layout, group-wise INT8) or that carry
hooks (a loaded LoRA adapter) are called one by one instead, so quantisation and adapters apply
unchanged. Other architectures run through `transformers`' modules (ModelRunner).

With `pack=True` (a model the engine owns: the inference service's), float projections on CPU keep
their weights in oneDNN's blocked layout instead of the plain one (`Packed`): bfloat16 matmuls read
them 2.6x faster at one row and 1.3-1.7x at 16-64 rows. The modules then hold stand-ins of the
weights' shapes, so the model's other users would compute with zeros; the first hooked call (an
adapter loaded later) turns a layer's weights back to plain ones. With `few_rows` as well, bfloat16
weights also keep their plain layout, which the engine's own kernel reads for steps of a few rows
(kernels.few_rows_limit(), dense.cpp): on an AMX Xeon's two cores it streams a 134M model's
projections at one row 1.8x as fast as oneDNN's packed kernel, for a second copy of those weights.
"""

from __future__ import annotations

import functools
import sys
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from services.inference.engine import kernels
from services.inference.engine.quantization import Int8Linear

SUPPORTED = ("llama", "mistral")

Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
"""(layer, q [N, H, D], k [N, KVH, D], v [N, KVH, D], scaling) -> [N, H, D]."""


def dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for rows x [N, in]; on CPUs through oneDNN's matmul.

    PyTorch's CPU matmul is MKL's, which on CPUs other than Intel's takes a generic path: on an
    AVX-512 AMD EPYC (2 cores) it reads a float32 weight at 11-17 GB/s where oneDNN reads it at
    23-25 GB/s, and at 16-64 rows oneDNN does 2-2.7x the float32 FLOPs. Same weights, no copy.
    A compiled graph calls it as one opaque operation, as it would a matmul: `llmp_native::dense`
    (kernels/dense.cpp) where the engine's kernels are built, which its C++ wrapper calls without
    entering Python, else `llmp::dense`.
    """
    if x.device.type == "cpu" and ONEDNN and x.dtype in ONEDNN_DTYPES and weight.dtype == x.dtype:
        if NATIVE:
            return torch.ops.llmp_native.dense(x, weight, bias)
        return torch.ops.llmp.dense(x, weight, bias)
    return F.linear(x, weight, bias)


NATIVE = False
"""llmp_native::dense is there (the engine's kernels are built: set by LlamaDecoder, outside any graph)."""
ONEDNN = torch.backends.mkldnn.is_available()
ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


@torch.library.custom_op("llmp::dense", mutates_args=())
def _onednn_dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    weight = _PACKED.get(weight.data_ptr(), weight)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [None], "")


_PACKED: dict[int, torch.Tensor] = {}
"""A stand-in's data pointer -> the oneDNN-layout weight it stands for (looked up inside the op, so a
compiled graph passes the stand-in, an ordinary tensor, and never sees the opaque one)."""


class Packed:
    """A float weight in oneDNN's blocked layout, and the stand-in the model's modules hold in its place.

    The stand-in has the weight's shape and dtype over a single zero element (no memory); `dense`
    given the stand-in, or a row view that starts at it, uses the packed weight. `plain()` gives the
    plain weight back (oneDNN reorders it) for modules that are called on their own again.
    """

    def __init__(self, weight: torch.Tensor, few_rows: bool = False) -> None:
        """`few_rows`: keep the plain weight as well, for the kernel of few-row bfloat16 steps (where
        it is built: kernels.few_rows_limit())."""
        weight = weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        few_rows = few_rows and weight.dtype == torch.bfloat16 and kernels.few_rows_limit() > 0
        self.kept: torch.Tensor | None = weight.contiguous() if few_rows else None
        self.stand_in = weight.new_zeros(()).expand(weight.shape)
        key = self.stand_in.data_ptr()
        _PACKED[key] = self.packed
        weakref.finalize(self, _PACKED.pop, key, None)
        if kernels.register_packed(self.stand_in, self.packed, self.kept):
            weakref.finalize(self, kernels.unregister_packed, key)

    @staticmethod
    def usable(weight: torch.Tensor) -> bool:
        return bool(ONEDNN and weight.device.type == "cpu" and weight.dtype in ONEDNN_DTYPES)

    def plain(self) -> torch.Tensor:
        return self.packed.to_dense() if self.kept is None else self.kept


@_onednn_dense.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def _bare(module: nn.Module) -> bool:
    """A plain nn.Linear that nothing hooks into (no LoRA adapter, no quantised replacement)."""
    return type(module) is nn.Linear and not _hooked(module)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


class _Fused:
    """One matmul standing for several projections of the same input, their outputs side by side."""

    def __init__(
        self,
        modules: list[Any],
        call: Callable[[torch.Tensor], torch.Tensor],
        packed: Packed | None = None,
        bias: torch.Tensor | None = None,
    ) -> None:
        self.modules, self.call, self.packed, self.bias = modules, call, packed, bias

    def usable(self) -> bool:
        """False once a module gets a hook (a LoRA adapter loaded later): then each runs on its own."""
        if not any(_hooked(m) for m in self.modules):
            return True
        if self.packed is not None:  # the modules are called on their own: they need their plain weights
            weight = self.packed.plain()
            _share_rows(self.modules, "weight", weight)
            self.call, self.packed = functools.partial(dense, weight=weight, bias=self.bias), None
        return False


def _fuse(modules: list[Any], pack: bool, few_rows: bool) -> _Fused | None:
    """Fuse plain float projections, or INT8 ones (Int8Linear.fuse decides which); None for anything else.

    The fused tensors hold the weights once: the modules' own weights become row views of them (of
    the packed weight's stand-in with `pack`).
    """
    if all(type(m) is Int8Linear for m in modules):
        fused = Int8Linear.fuse(modules)
        return None if fused is None else _Fused(modules, fused)
    biases = [m.bias for m in modules]
    if not all(type(m) is nn.Linear for m in modules) or len({b is None for b in biases}) > 1:
        return None
    weight = torch.cat([m.weight.detach() for m in modules])
    bias = torch.cat([b.detach() for b in biases]) if biases[0] is not None else None
    packed = Packed(weight, few_rows) if pack and Packed.usable(weight) else None
    if packed is not None:
        weight = packed.stand_in
    _share_rows(modules, "weight", weight)
    if bias is not None:
        _share_rows(modules, "bias", bias)
    return _Fused(modules, functools.partial(dense, weight=weight, bias=bias), packed, bias)


def _share_rows(modules: list[nn.Linear], name: str, fused: torch.Tensor) -> None:
    """Point each module's parameter `name` at its rows of `fused`."""
    start = 0
    for m in modules:
        stop = start + m.out_features
        getattr(m, name).data = fused[start:stop]
        start = stop


class _Layer:
    """One decoder layer's modules and, where its projections allow, their fused weights."""

    def __init__(self, layer: Any, config: Any, pack: bool, few_rows: bool) -> None:
        self.layer = layer
        attn, mlp = layer.self_attn, layer.mlp
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(attn, "head_dim", None) or config.hidden_size // self.heads
        self.scaling = float(attn.scaling)
        self.qkv_modules = [attn.q_proj, attn.k_proj, attn.v_proj]
        self.gate_up_modules = [mlp.gate_proj, mlp.up_proj]
        self.qkv = None if any(_hooked(m) for m in self.qkv_modules) else _fuse(self.qkv_modules, pack, few_rows)
        self.gate_up = (
            None if any(_hooked(m) for m in self.gate_up_modules) else _fuse(self.gate_up_modules, pack, few_rows)
        )
        self.rotate_half = sys.modules[type(attn).__module__].rotate_half
        self.projections = [*self.qkv_modules, attn.o_proj, *self.gate_up_modules, mlp.down_proj]
        if pack:
            for module in (attn.o_proj, mlp.down_proj):
                _pack_module(module, few_rows)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, index: int, attend: Attend
    ) -> torch.Tensor:
        """x [N, hidden] -> [N, hidden]."""
        layer, n = self.layer, x.shape[0]
        h = _norm(layer.input_layernorm, x)
        heads = self.heads + self.kv_heads
        if self.qkv is not None and self.qkv.usable():
            qkv = self.qkv.call(h)  # [N, (H + 2 KVH) D]: q and k side by side, rotated in one go
            qk = _rotate(qkv[:, : heads * self.head_dim].view(n, heads, self.head_dim), cos, sin, self.rotate_half)
            q, k = qk.split([self.heads, self.kv_heads], dim=1)
            v = qkv[:, heads * self.head_dim :]
        else:
            q, k, v = (_linear(m, h) for m in self.qkv_modules)
            q = _rotate(q.view(n, self.heads, self.head_dim), cos, sin, self.rotate_half)
            k = _rotate(k.view(n, self.kv_heads, self.head_dim), cos, sin, self.rotate_half)
        o = attend(index, q, k, v.reshape(n, self.kv_heads, self.head_dim), self.scaling)  # [N, H, D]
        x = x + _linear(layer.self_attn.o_proj, o.reshape(n, -1))
        h = _norm(layer.post_attention_layernorm, x)
        mlp = layer.mlp
        if self.gate_up is not None and self.gate_up.usable():
            gate, up = self.gate_up.call(h).chunk(2, dim=-1)
        else:
            gate, up = _linear(mlp.gate_proj, h), _linear(mlp.up_proj, h)
        return x + _linear(mlp.down_proj, mlp.act_fn(gate) * up)


def _linear(module: Any, x: torch.Tensor) -> torch.Tensor:
    """A projection module on packed rows [N, in]; modules see [1, N, in], as in transformers' own pass."""
    if _bare(module):
        return dense(x, module.weight, module.bias)
    packed: Packed | None = getattr(module, "_llmp_packed", None)
    if packed is not None:  # hooked since it was packed: the module computes with its plain weight again
        module.weight.data = packed.plain()
        del module._llmp_packed
    return module(x[None])[0]


def _pack_module(module: Any, few_rows: bool) -> None:
    """Give a bare float projection a packed weight: the module holds its stand-in (see _linear)."""
    if _bare(module) and Packed.usable(module.weight):
        packed = Packed(module.weight, few_rows)
        module.weight.data = packed.stand_in
        module._llmp_packed = packed


def _norm(module: Any, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm in one call where it is Llama's float32 one (the same arithmetic); else the module."""
    eps = getattr(module, "variance_epsilon", None)
    if eps is not None and x.dtype == torch.float32 and type(module).__name__.endswith("RMSNorm"):
        return F.rms_norm(x, (x.shape[-1],), module.weight, eps)
    return module(x)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotate_half: Callable[..., Any]) -> torch.Tensor:
    """Rotary embedding of x [N, heads, D] at cos/sin [N, 1, D], as the model's apply_rotary_pos_emb does."""
    return x * cos + rotate_half(x) * sin


class LlamaDecoder:
    """Hidden states of a packed step through a Llama-style model's decoder, attention supplied by the caller."""

    def __init__(self, model: PreTrainedModel, pack: bool = False, few_rows: bool = False) -> None:
        """`pack`: keep float projection weights in oneDNN's layout (see the module's notes); the
        model's modules then hold stand-ins, so only a model this decoder owns may be packed.
        `few_rows` (with `pack`): bfloat16 weights keep their plain layout too, for few-row steps."""
        global NATIVE
        NATIVE = kernels.available()
        inner: Any = model.base_model
        self.inner = inner
        self.layers = [_Layer(layer, model.config, pack, few_rows) for layer in inner.layers]
        head = model.get_output_embeddings()
        if pack and head is not None and head.weight.data_ptr() != inner.embed_tokens.weight.data_ptr():
            _pack_module(head, few_rows)  # a head tied to the embeddings keeps its plain weight: the lookup reads it

    @staticmethod
    def supports(model: PreTrainedModel) -> bool:
        inner: Any = model.base_model
        parts = ("embed_tokens", "layers", "norm", "rotary_emb")
        if model.config.model_type not in SUPPORTED or not all(hasattr(inner, p) for p in parts):
            return False
        return all(
            all(hasattr(layer.self_attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling"))
            and all(hasattr(layer.mlp, p) for p in ("gate_proj", "up_proj", "down_proj", "act_fn"))
            for layer in inner.layers
        )

    def plain(self) -> bool:
        """No projection carries a hook (a LoRA adapter): what a compiled graph of this pass assumes."""
        return not any(_hooked(m) for layer in self.layers for m in layer.projections)

    def head(self, model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
        """The output head on rows of last hidden states [R, hidden] -> logits [R, vocab]."""
        return _linear(model.get_output_embeddings(), hidden)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """ids, positions [N] -> last hidden states [N, hidden]."""
        x = self.inner.embed_tokens(ids)  # [N, hidden]
        cos, sin = self.inner.rotary_emb(x, positions[None])  # [1, N, D] each
        cos, sin = cos[0, :, None], sin[0, :, None]  # [N, 1, D]
        for index, layer in enumerate(self.layers):
            x = layer.forward(x, cos, sin, index, attend)
        return _norm(self.inner.norm, x)
