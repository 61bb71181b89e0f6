"""The engine's own CPU kernels, built on first use for the machine they run on.

`paged_decode_attention` (paged_attention.cpp): decode attention, one query a row, over the paged
KV cache where it lies. Each (row, key head) streams its context's cached tokens once for the
scores and once for the values, in memory order, accumulating in float32 for every query head
of its group. TorchInductor cannot make that loop from tensor operations: its weighted sum of
values is a reduction over an outer dimension of gathered blocks, which on 2 AVX-512 cores took
3.3-3.6 ms a layer at 64 rows x 96 tokens in bfloat16, where this kernel reads the same 19 MB in
a fraction of it.

The kernel is compiled with the machine's own instruction set (`-march=native`) through
`torch.utils.cpp_extension` (g++, ninja) into torch's extension cache, under a name that covers the
CPU's flags, so a home shared by machines of other CPUs never loads a build it cannot run. It is
registered as the operator `llmp::paged_decode_attention`, which compiled graphs call as one
opaque operation. Where it cannot be built (no compiler, another CPU architecture) `available()`
is False, with a warning, and the engine computes attention with tensor operations instead.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_attention.cpp")
DTYPES = (torch.float32, torch.bfloat16)


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return os.uname().machine


@functools.cache
def _extension() -> Any | None:
    """The built kernel module, or None (with a warning) where it cannot be built here."""
    try:
        from torch.utils import cpp_extension

        if shutil.which("ninja") is None:  # the `ninja` wheel's binary, where its bin/ is not on PATH
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        digest = hashlib.sha256(_cpu_flags().encode()).hexdigest()[:12]
        return cpp_extension.load(
            name=f"llmp_paged_attention_{digest}",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # no compiler or ninja, an unsupported CPU: tensor operations instead
        log.warning("the engine's attention kernel could not be built, using tensor operations: %s", e)
        return None


def available() -> bool:
    return _extension() is not None


def supports(dtype: torch.dtype, head_dim: int, device: torch.device) -> bool:
    """Whether `paged_decode_attention` runs for this cache: CPU, float32/bfloat16, whole vectors a head."""
    ext = _extension() if device.type == "cpu" and dtype in DTYPES else None
    return ext is not None and head_dim % ext.vector_width() == 0


@torch.library.custom_op("llmp::paged_decode_attention", mutates_args=())
def paged_decode_attention(
    q: torch.Tensor,
    key_blocks: torch.Tensor,
    value_blocks: torch.Tensor,
    read_blocks: torch.Tensor,
    mask: torch.Tensor | None,
    width: int,
    scale: float,
) -> torch.Tensor:
    """q [b, H, D] over each row's cached blocks -> [b, H, D] (q's dtype).

    key/value_blocks [blocks, block_size, KVH, D]; read_blocks [b, n] each row's blocks in order;
    mask [b, m >= width] True where the key is attended, or None for every key; keys at `width`
    and past it are not read. Only where `supports` says so.
    """
    ext = _extension()
    assert ext is not None, "paged_decode_attention called where kernels.supports() is False"
    return ext.decode_attention(q, key_blocks, value_blocks, read_blocks, mask, width, scale)


@paged_decode_attention.register_fake
def _(q, key_blocks, value_blocks, read_blocks, mask, width, scale):  # type: ignore[no-untyped-def]
    return torch.empty_like(q)
