"""The engine's CPU kernels: decode attention against SDPA over the same keys and values, gathered;
the few-rows projection against float64 and oneDNN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.inference.engine import kernels
from tests.helpers.tiny_models import NEEDS_KERNEL

pytestmark = NEEDS_KERNEL

BLOCK = 4
BLOCKS = 40


def reference(q, key_blocks, value_blocks, read, mask, width, scale):  # type: ignore[no-untyped-def]
    """SDPA of q [b, H, D] over each row's gathered blocks, in float64."""
    b, heads, d = q.shape
    kv_heads = key_blocks.shape[2]
    k = key_blocks[read].reshape(b, -1, kv_heads, d)[:, :width].transpose(1, 2).double()
    v = value_blocks[read].reshape(b, -1, kv_heads, d)[:, :width].transpose(1, 2).double()
    allowed = None if mask is None else mask[:, None, None, :width]
    out = F.scaled_dot_product_attention(
        q[:, :, None].double(), k, v, attn_mask=allowed, scale=scale, enable_gqa=heads != kv_heads
    )
    return out[:, :, 0]


def case(dtype: torch.dtype, rows: int, heads: int, kv_heads: int, dim: int, blocks_per_row: int, seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    key_blocks = torch.randn(BLOCKS, BLOCK, kv_heads, dim, generator=g).to(dtype)
    value_blocks = torch.randn(BLOCKS, BLOCK, kv_heads, dim, generator=g).to(dtype)
    if rows * blocks_per_row <= BLOCKS:
        read = torch.randperm(BLOCKS, generator=g)[: rows * blocks_per_row].view(rows, blocks_per_row)
    else:  # rows share blocks, as with a cached prefix
        read = torch.randint(0, BLOCKS, (rows, blocks_per_row), generator=g)
    q = torch.randn(rows, heads, dim, generator=g).to(dtype)
    return q, key_blocks, value_blocks, read


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(("rows", "heads", "kv_heads"), [(1, 4, 4), (5, 8, 2), (64, 4, 1)], ids=["one", "gqa", "mqa"])
def test_masked_rows_equal_sdpa_over_the_gathered_blocks(
    dtype: torch.dtype, rows: int, heads: int, kv_heads: int
) -> None:
    """Each row's own context length, a window's hidden head and freed-block padding, all by the mask."""
    dim, per_row = 32, 5
    q, kb, vb, read = case(dtype, rows, heads, kv_heads, dim, per_row)
    context = per_row * BLOCK
    ends = torch.randint(1, context + 1, (rows,), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(context)[None]
    mask = (pos < ends[:, None]) & (ends[:, None] - pos <= 7)  # the last 7 keys: a sliding window
    assert kernels.supports(dtype, dim, q.device)
    got = kernels.paged_decode_attention(q, kb, vb, read, mask, context, dim**-0.5)
    want = reference(q, kb, vb, read, mask, context, dim**-0.5)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.double(), want, atol=tolerance, rtol=tolerance)


def test_without_a_mask_keys_past_the_width_are_not_read() -> None:
    q, kb, vb, read = case(torch.float32, 3, 4, 2, 16, 3)
    width = 9  # the middle of the third block: its last 3 keys are not the context
    got = kernels.paged_decode_attention(q, kb, vb, read, None, width, 0.3)
    torch.testing.assert_close(got.double(), reference(q, kb, vb, read, None, width, 0.3), atol=1e-5, rtol=1e-5)
    kb[read[:, 2], 1:] = float("nan")  # past the width: never read, so the output stays finite
    assert torch.isfinite(kernels.paged_decode_attention(q, kb, vb, read, None, width, 0.3)).all()


def test_a_block_id_outside_the_cache_is_refused_not_read() -> None:
    q, kb, vb, read = case(torch.float32, 2, 4, 4, 16, 2)
    read[1, 1] = BLOCKS
    with pytest.raises(RuntimeError, match="block id out of range"):
        kernels.paged_decode_attention(q, kb, vb, read, None, 2 * BLOCK, 0.25)


def test_a_head_size_of_no_whole_vectors_is_left_to_tensor_operations() -> None:
    assert not kernels.supports(torch.float32, 12, torch.device("cpu"))
    assert not kernels.supports(torch.float16, 64, torch.device("cpu"))


def test_value_blocks_of_another_shape_are_refused_not_read() -> None:
    q, kb, vb, read = case(torch.float32, 2, 4, 4, 16, 2)
    with pytest.raises(RuntimeError, match="key and value blocks differ"):
        kernels.paged_decode_attention(q, kb, vb[: BLOCKS // 2], read, None, 2 * BLOCK, 0.25)


NEEDS_FEW_ROWS = pytest.mark.skipif(
    kernels.few_rows_limit() == 0, reason="the few-rows projection kernel needs a CPU with AVX-512 BF16"
)


def packed_with(weight: torch.Tensor, plain: torch.Tensor | None) -> torch.Tensor:
    """A stand-in registered for `weight` in oneDNN's layout and `plain` as its plain weight."""
    stand_in = weight.new_zeros(()).expand(weight.shape)
    assert kernels.register_packed(stand_in, torch.ops.mkldnn._reorder_linear_weight(weight, None), plain)
    return stand_in


@NEEDS_FEW_ROWS
@pytest.mark.parametrize(("out", "inputs"), [(1, 8), (7, 31), (8, 32), (9, 70), (130, 768)])
def test_few_rows_compute_what_float64_and_onednn_compute(out: int, inputs: int) -> None:
    g = torch.Generator().manual_seed(out * inputs)
    weight = torch.randn(out, inputs, generator=g).to(torch.bfloat16)
    bias = torch.randn(out, generator=g).to(torch.bfloat16)
    stand_in, onednn_only = packed_with(weight, weight), packed_with(weight, None)
    try:
        for rows in range(1, kernels.few_rows_limit() + 1):
            x = torch.randn(rows, inputs, generator=g).to(torch.bfloat16)
            for b in (bias, None):
                want = F.linear(x.double(), weight.double(), None if b is None else b.double())
                got = torch.ops.llmp_native.dense(x, stand_in, b)
                onednn = torch.ops.llmp_native.dense(x, onednn_only, b)
                assert got.dtype == torch.bfloat16 and got.shape == (rows, out)
                # float32 sums rounded once to bfloat16: within one bfloat16 step of the exact value
                torch.testing.assert_close(got.double(), want, atol=1e-2, rtol=2**-7)
                torch.testing.assert_close(got, onednn, atol=1e-2, rtol=2**-7)
    finally:
        for s in (stand_in, onednn_only):
            kernels.unregister_packed(s.data_ptr())


@NEEDS_FEW_ROWS
def test_the_plain_weight_serves_few_rows_and_the_packed_one_more() -> None:
    """Registered with a plain weight that differs from the packed one, the output shows which was read."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(24, 64, generator=g).to(torch.bfloat16)
    stand_in = packed_with(weight, weight * 2)
    try:
        limit = kernels.few_rows_limit()
        for rows, factor in ((1, 2), (limit, 2), (limit + 1, 1), (16, 1)):
            x = torch.randn(rows, 64, generator=g).to(torch.bfloat16)
            want = F.linear(x.double(), weight.double()) * factor
            got = torch.ops.llmp_native.dense(x, stand_in, None)
            torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2**-7)
        x = torch.randn(2, 64, generator=g)  # float32 rows never take the bfloat16 kernel
        with pytest.raises(RuntimeError):  # oneDNN refuses mixed types rather than reading the plain weight
            torch.ops.llmp_native.dense(x, stand_in, None)
    finally:
        kernels.unregister_packed(stand_in.data_ptr())
