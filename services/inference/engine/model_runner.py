"""One engine step's forward pass: many sequences' token chunks through the model over the paged cache.

The model is `transformers`' own module (Llama, Mistral, GPT-2, GPT-NeoX): embeddings, norms,
rotary embeddings (with any RoPE scaling), MLPs and heads are theirs, so every architecture they
define runs unchanged. Only attention is ours (`attend`), plugged in through transformers' public
`AttentionInterface` under the name "llmp_paged": it writes the step's new keys/values into the
cache slots and attends over each sequence's cached context. Called without step metadata (e.g.
by `generate`) it behaves exactly like transformers' SDPA attention. Llama-style models run their
layers through the engine's leaner pass over the same modules (decoder.py), with the same `attend`.

A step packs all chunks into one row of N tokens, so token-wise work (projections, MLP) runs once
over N tokens with no padding. Attention runs in groups of chunks of equal length (all decoding
sequences, with one token each, form one group), each group one batched call whose keys are
padded to its longest context.

Compiled decode (`compile=True`, Llama-style models): a step whose every chunk is one token, the
common case once prompts are in, runs as one `torch.compile`d graph from embeddings to logits.
The norms, rotary embeddings, cache writes and gathers, residual adds and activations of every
layer become a few generated kernels between the projections' matmuls instead of about fifty
dispatched operations each, which at small batches costs as much as reading the weights, and a
generated C++ wrapper calls them all without a Python call between them. Decoding rows (of
compiled and eager steps alike) attend through the engine's kernel (kernels.paged_decode_attention),
which reads each row's cached tokens in place, in memory order; where it cannot be built, a
compiled step's attention is a generated loop per layer over the cached blocks (_attend_decode)
and an eager step's is SDPA over gathered blocks. Shapes are dynamic (batch, context), so two
graphs serve every decode step, a batch of one and a batch of more; each compiles at its first
step (about a minute on two CPU cores), or at load with LLMEngine.warm_up. Steps with prompt
chunks, drafted tokens or LoRA adapters run eagerly; a toolchain that can't compile turns it off
with a warning.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx.experimental._config
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from services.inference.engine import kernels
from services.inference.engine.batch import StepChunk
from services.inference.engine.decoder import LlamaDecoder
from services.inference.engine.kv_cache import KVCache

ATTENTION = "llmp_paged"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttentionGroup:
    token_index: torch.Tensor  # [b, q] positions of the group's queries in the packed step
    read_blocks: torch.Tensor  # [b, n] cache blocks of each row's context, in order (padding reads block 0)
    width: int  # c: the longest context in tokens; keys past it in the last block are not read
    mask: torch.Tensor | None  # [b, 1, q, c] True where a query may attend to a key; None: every key, every row


class GatherBuffers:
    """Reused output memory for the per-layer gathers of cached blocks.

    A fresh tensor per gather costs more than the copy itself: the allocator hands back new pages
    that the kernel must fault in and zero. Layers run one after another, so one key and one
    value buffer serve them all; they grow to the largest step seen.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def gather(self, name: str, source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """source[index] along dim 0, written into the buffer `name`."""
        shape = (index.numel(), *source.shape[1:])
        size = index.numel() * source[0].numel()
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < size or buffer.dtype != source.dtype or buffer.device != source.device:
            buffer = self._buffers[name] = torch.empty(size, dtype=source.dtype, device=source.device)
        return torch.index_select(source, 0, index, out=buffer[:size].view(shape))


@dataclass(frozen=True)
class StepMetadata:
    cache: KVCache
    write_slots: torch.Tensor  # [N] cache slot of every token computed this step
    groups: list[AttentionGroup]
    buffers: GatherBuffers | None  # None: a compiled decode step, whose attention reads the cache itself
    gqa: bool  # fewer key/value heads than query heads
    kernel: bool = False  # decoding rows attend through kernels.paged_decode_attention


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query [1, H, N, D], key/value [1, KVH, N, D] -> ([1, N, H, D], None)."""
    step: StepMetadata | None = kwargs.pop("llmp_step", None)
    if step is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [N, heads, D]
    return attend(step, int(module.layer_idx), q, k, v, scaling).unsqueeze(0), None  # type: ignore[arg-type]


def attend(
    step: StepMetadata, layer: int, q_all: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None
) -> torch.Tensor:
    """Write the step's keys/values [N, KVH, D] into the cache; queries [N, H, D] over their contexts -> [N, H, D]."""
    cache_k, cache_v = step.cache.key[layer], step.cache.value[layer]  # [slots, KVH, D]
    cache_k.index_copy_(0, step.write_slots, key)
    cache_v.index_copy_(0, step.write_slots, value)
    # Read whole blocks: one contiguous copy per block instead of one per token.
    blocks_k = cache_k.view(-1, step.cache.block_size, *cache_k.shape[1:])  # [blocks, block_size, KVH, D]
    blocks_v = cache_v.view(blocks_k.shape)
    if len(step.groups) == 1:  # every chunk of one length (e.g. all decoding): the step is the group, in order
        g = step.groups[0]
        q = q_all.view(*g.token_index.shape, *q_all.shape[1:]).transpose(1, 2)  # [b, H, q, D]
        o = _attend(q, blocks_k, blocks_v, g, scaling, step)
        return o.transpose(1, 2).reshape(q_all.shape)
    out = torch.empty_like(q_all)
    for g in step.groups:
        q = q_all[g.token_index].transpose(1, 2)  # [b, H, q, D]
        o = _attend(q, blocks_k, blocks_v, g, scaling, step)
        out[g.token_index.flatten()] = o.transpose(1, 2).flatten(0, 1)  # [b * q, H, D]
    return out


def _attend(
    q: torch.Tensor,
    blocks_k: torch.Tensor,
    blocks_v: torch.Tensor,
    g: AttentionGroup,
    scaling: float | None,
    step: StepMetadata,
) -> torch.Tensor:
    """q [b, H, q, D] over the group's cached blocks -> [b, H, q, D]."""
    b, heads, length, d = q.shape
    if length == 1 and step.kernel:  # decoding rows: the engine's kernel
        mask = None if g.mask is None else g.mask.reshape(b, -1)
        scale = d**-0.5 if scaling is None else scaling
        out = kernels.paged_decode_attention(
            q.reshape(b, heads, d), blocks_k, blocks_v, g.read_blocks, mask, g.width, scale
        )
        return out.view(b, heads, 1, d)
    buffers = step.buffers
    if buffers is None:
        return _attend_decode(q, blocks_k, blocks_v, g, scaling)
    b, n = g.read_blocks.shape
    index = g.read_blocks.view(-1)
    shape = (b, n * blocks_k.shape[1], *blocks_k.shape[2:])  # [b, n * block_size, KVH, D]
    k = buffers.gather("key", blocks_k, index).view(shape)[:, : g.width].transpose(1, 2)  # [b, KVH, c, D]
    v = buffers.gather("value", blocks_v, index).view(shape)[:, : g.width].transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=g.mask, scale=scaling, enable_gqa=step.gqa)


def _attend_decode(
    q: torch.Tensor, blocks_k: torch.Tensor, blocks_v: torch.Tensor, g: AttentionGroup, scaling: float | None
) -> torch.Tensor:
    """One query a row, q [b, H, 1, D], over the group's cached blocks -> [b, H, 1, D], written for a compiled
    graph where the engine's kernel (kernels.paged_decode_attention) does not run.

    Scores and the weighted sum of values are spelled as products and sums over the blocks indexed
    in place, so the compiler makes each one loop that reads the cached keys (values) where they lie,
    once, accumulating in float32: no gathered copy of the context and no attention kernel, whose
    per-row set-up dominates at one query (bfloat16's on CPUs without AMX is 3x slower than float32's).
    """
    b, heads, _, d = q.shape
    kv_heads = blocks_k.shape[2]
    width = g.read_blocks.shape[1] * blocks_k.shape[1]
    k = blocks_k[g.read_blocks].view(b, width, kv_heads, 1, d)  # [b, c, KVH, 1, D]
    v = blocks_v[g.read_blocks].view(b, width, kv_heads, 1, d)
    per_kv = q.view(b, 1, kv_heads, heads // kv_heads, d).float()  # query heads grouped by their key head
    scores = (per_kv * k.float()).sum(-1) * (d**-0.5 if scaling is None else scaling)  # [b, c, KVH, G]
    assert g.mask is not None  # compiled steps always carry one: it hides padding and the window
    scores = scores.masked_fill(~g.mask.view(b, width, 1, 1), float("-inf"))
    weights = torch.softmax(scores, dim=1)[..., None]  # [b, c, KVH, G, 1]
    return (weights * v.float()).sum(1).view(b, heads, 1, d).to(q.dtype)


AttentionInterface.register(ATTENTION, paged_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # used only when called without step metadata


class ModelRunner:
    """Runs packed steps of a causal LM whose attention reads and writes a KVCache.

    It switches the model's attention implementation to the paged one, in place; plain calls of
    the model (without step metadata) keep computing what SDPA attention computes.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        cache: KVCache,
        *,
        compile: bool = False,
        sliding_window: int | None = None,
        pack: bool = False,
        few_rows: bool = False,
        kernel: bool = True,
    ) -> None:
        """`sliding_window`: keys older than this many tokens are masked; None: the model config's window.
        `pack`: the decoder keeps float weights in oneDNN's layout (LlamaDecoder), and with `few_rows`
        bfloat16 ones in their plain layout too, for few-row steps. `kernel`: decoding rows
        attend through kernels.paged_decode_attention where it supports the cache."""
        model.set_attn_implementation(ATTENTION)
        self.model = model
        self.cache = cache
        self.device = next(model.parameters()).device
        self.sliding_window: int | None = sliding_window or getattr(model.config, "sliding_window", None)
        self.buffers = GatherBuffers()
        self.gqa = model.config.num_attention_heads != cache.shape.num_kv_heads
        # decided (and the kernel built) at load: not mid-request, and not inside a traced graph
        self.kernel = kernel and kernels.supports(cache.key[0].dtype, cache.shape.head_dim, cache.key[0].device)
        self.decoder = LlamaDecoder(model, pack, few_rows) if LlamaDecoder.supports(model) else None
        self.compiled: Callable[..., torch.Tensor] | None = None
        if compile and self.decoder is not None:
            for tensor in (*cache.key, *cache.value):  # fixed shapes: only batch and context vary
                torch._dynamo.mark_static(tensor)
            # Graphs are kept per code object: every runner in the process (models of other shapes or
            # quantisations, batch of one or many, masked or not) shares dynamo's default limit of 8.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            # A C++ wrapper calls the step's ~150 kernels and matmuls without a Python call each: 3-4 ms
            # a token less on a 134M model (about a tenth of a batch-1 decode step on two cores).
            self.compiled = torch.compile(self._decode, options={"cpp_wrapper": True})

    @torch.inference_mode()
    def forward(self, chunks: list[StepChunk]) -> torch.Tensor:
        """Logits of the last `num_logits` tokens of every chunk with `sample` set, in order: [rows, vocab] float32."""
        ids = torch.tensor([t for c in chunks for t in c.token_ids], device=self.device)  # [N]
        positions = torch.tensor(
            [p for c in chunks for p in range(c.start, c.start + len(c.token_ids))], device=self.device
        )
        ends = (torch.tensor([len(c.token_ids) for c in chunks]).cumsum(0) - 1).tolist()
        rows = [e - i for e, c in zip(ends, chunks, strict=True) if c.sample for i in range(c.num_logits - 1, -1, -1)]
        wanted = torch.tensor(rows, dtype=torch.long, device=self.device)
        compiled = self.compiled
        if compiled is not None and not (len(ids) == len(rows) == len(chunks) and self.decoder.plain()):  # type: ignore[union-attr]
            compiled = None  # not a decode step (one token a chunk, each sampled), or an adapter is on
        step = self.metadata(chunks, masked=compiled is not None)
        if compiled is not None:
            g = step.groups[0]  # one token a chunk: one group, in step order
            try:
                # Batch size and context are dynamic and the mask is never dropped, so two graphs serve
                # every decode step: a batch of one and a batch of more (see warm_up in engine.py).
                args = (ids, positions, step.write_slots, g.read_blocks, g.mask, wanted)
                for tensor, dims in zip(args, [(0,), (0,), (0,), (0, 1), (0, 3), (0,)], strict=True):
                    torch._dynamo.maybe_mark_dynamic(tensor, dims)
                # Only the marked dims vary: a model of other shapes compiled earlier in the process
                # must not turn this one's head counts and sizes into symbols (automatic dynamic).
                with (
                    torch.fx.experimental._config.patch(backed_size_oblivious=True),  # type: ignore[attr-defined]
                    torch._dynamo.config.patch(automatic_dynamic_shapes=False),
                ):
                    return compiled(*args)
            except Exception as e:  # the compiler failed (no toolchain, an unsupported op): eager from now on
                log.warning("compiled decode is off, running eagerly: %s", e)
                self.compiled = None
        if self.decoder is not None:
            hidden = self.decoder.forward(ids, positions, functools.partial(attend, step))  # [N, hidden]
            return self.decoder.head(self.model, hidden[wanted]).float()
        hidden = self.model.base_model(
            input_ids=ids[None], position_ids=positions[None], use_cache=False, llmp_step=step
        ).last_hidden_state[0]
        return self.model.get_output_embeddings()(hidden[wanted]).float()

    def _decode(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        read_blocks: torch.Tensor,
        mask: torch.Tensor,
        wanted: torch.Tensor,
    ) -> torch.Tensor:
        """A step of single-token chunks through the Llama decoder and the head (what `compiled` compiles)."""
        n = ids.shape[0]
        width = read_blocks.shape[1] * self.cache.block_size  # the mask hides keys past each row's end
        group = AttentionGroup(torch.arange(n, device=self.device)[:, None], read_blocks, width, mask)
        step = StepMetadata(self.cache, slots, [group], None, self.gqa, self.kernel)
        hidden = self.decoder.forward(ids, positions, functools.partial(attend, step))  # type: ignore[union-attr]
        return self.decoder.head(self.model, hidden[wanted]).float()  # type: ignore[union-attr]

    def metadata(self, chunks: list[StepChunk], masked: bool = False) -> StepMetadata:
        """The step's cache slots and attention groups; `masked`: every group has a mask, even where not needed."""
        offsets = [0]
        write: list[int] = []
        by_length: dict[int, list[int]] = {}
        for i, c in enumerate(chunks):
            write.extend(self.cache.slot_ids(c.seq_id, c.start, c.start + len(c.token_ids)))
            offsets.append(offsets[-1] + len(c.token_ids))
            by_length.setdefault(len(c.token_ids), []).append(i)
        groups = [self.group([chunks[i] for i in ix], [offsets[i] for i in ix], masked) for ix in by_length.values()]
        slots = torch.tensor(write, dtype=torch.long, device=self.device)
        return StepMetadata(self.cache, slots, groups, self.buffers, self.gqa, self.kernel)

    def group(self, chunks: list[StepChunk], offsets: list[int], masked: bool = False) -> AttentionGroup:
        """Chunks of equal length q attending to their contexts, padded to the longest context (blocks a
        sliding window freed are read as block 0, which the window's mask hides)."""
        q = len(chunks[0].token_ids)
        size = self.cache.block_size
        ends = [c.start + q for c in chunks]  # context of each row after this step
        width = max(ends)
        blocks = -(-width // size)
        if masked:  # every key of the blocks read, so the width follows from the blocks' shape
            width = blocks * size
        read = torch.tensor(
            [(b := self.cache.blocks(c.seq_id)[:blocks]) + [0] * (blocks - len(b)) for c in chunks], dtype=torch.long
        )  # [b, n]: padding reads block 0, hidden by the mask
        token_index = torch.tensor(offsets)[:, None] + torch.arange(q)  # [b, q]
        mask = None
        if masked or q > 1 or min(ends) < width or (self.sliding_window is not None and width > self.sliding_window):
            query_pos = torch.tensor(ends)[:, None] - q + torch.arange(q)  # [b, q]
            key_pos = torch.arange(width)  # [c]
            mask = key_pos[None, None, :] <= query_pos[:, :, None]  # [b, q, c]: causal; also hides padding
            if self.sliding_window is not None:
                mask &= query_pos[:, :, None] - key_pos[None, None, :] < self.sliding_window
            mask = mask[:, None].to(self.device)
        return AttentionGroup(token_index.to(self.device), read.to(self.device), width, mask)
