"""The engine's own CPU kernels, built on first use for the machine they run on.

- `paged_decode_attention` (paged_attention.cpp): decode attention, one query a row, over the
  paged KV cache where it lies. Each row streams its context's cached tokens once for the scores
  and once for the values, in memory order, accumulating in float32 for every query head (a query
  head reads its group's key head). TorchInductor cannot make that loop from tensor operations:
  its weighted sum of values is a reduction over an outer dimension of gathered blocks, which on 2
  AVX-512 cores took 2.7-3.4 ms a layer at 64 rows x 96 tokens in bfloat16 (5.3 ms in float32),
  where this kernel takes 0.6 ms (1.0 ms), and a 134M Llama's decode step at 64 rows went from
  72 to 59 ms.
- `llmp_native::dense` (dense.cpp): a projection through oneDNN of a plain weight or of a packed
  one's stand-in (decoder.Packed registers them here), the C++ twin of decoder's `llmp::dense`,
  which a compiled graph's C++ wrapper calls without entering Python: 30-40 us less per
  projection, about 1.5 ms of a 20 ms batch-1 step of that model. A bfloat16 step of at most
  `few_rows_limit()` rows with a plain weight at hand goes through the file's own kernel instead
  (AVX-512 BF16 dot products streaming the weight once): 1.8x oneDNN's packed kernel at one row
  on an AMX Xeon's two cores.

They are compiled with the machine's own instruction set (`-march=native`) through
`torch.utils.cpp_extension` (g++, ninja) into the Python environment (`<prefix>/var/llmp-kernels`;
torch's extension cache under HOME where the environment is read-only), under a name that covers
torch's version and the CPU's flags, so an environment shared by machines of other CPUs never
loads a build it cannot run. A build takes about 45 s on two cores, once: `make setup` does it.
Where they cannot be built (no compiler, another CPU architecture) `available()` is False, with a
warning, and the engine uses tensor operations and decoder's Python operator instead.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name) for name in ("module.cpp", "paged_attention.cpp", "dense.cpp")]
DTYPES = (torch.float32, torch.bfloat16)


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return os.uname().machine


def _build_directory(name: str) -> str | None:
    """The environment's own folder for the build (`make setup` builds there, so every process of
    the environment finds it, whatever its HOME); None (torch's cache under HOME) where the
    environment is read-only, as in the service images."""
    folder = Path(sys.prefix) / "var" / "llmp-kernels" / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return str(folder) if os.access(folder, os.W_OK) else None


@functools.cache
def _extension() -> Any | None:
    """The built kernels' module, or None (with a warning) where it cannot be built here."""
    try:
        from torch.utils import cpp_extension

        if shutil.which("ninja") is None:  # the `ninja` wheel's binary, where its bin/ is not on PATH
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        machine = f"{torch.__version__} {_cpu_flags()}"  # a build is for one torch and one instruction set
        name = f"llmp_engine_kernels_{hashlib.sha256(machine.encode()).hexdigest()[:12]}"
        module = cpp_extension.load(
            name=name,
            sources=[str(path) for path in SOURCES],
            build_directory=_build_directory(name),
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
        torch.library.register_fake("llmp_native::dense")(_dense_shape)
        torch.library.register_fake("llmp_native::paged_decode_attention")(_attention_shape)
        return module
    except Exception as e:  # no compiler or ninja, an unsupported CPU: tensor operations instead
        log.warning("the engine's CPU kernels could not be built, using tensor operations: %s", e)
        return None


def _dense_shape(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def _attention_shape(q: torch.Tensor, *args: Any) -> torch.Tensor:
    return torch.empty_like(q)


def available() -> bool:
    return _extension() is not None


def register_packed(stand_in: torch.Tensor, packed: torch.Tensor, plain: torch.Tensor | None = None) -> bool:
    """Let llmp_native::dense find `packed` (a oneDNN-layout weight) by its stand-in, and `plain` (the
    same weight, plain and contiguous) for steps of up to `few_rows_limit()` rows; False where the
    kernels are not built. `unregister_packed(stand_in.data_ptr())` forgets it."""
    ext = _extension()
    if ext is not None:
        ext.register_packed(stand_in, packed, plain)
    return ext is not None


def few_rows_limit() -> int:
    """Most rows of a bfloat16 projection llmp_native::dense computes with its own kernel from the
    plain weight (dense.cpp); 0 where the kernels are not built or the CPU lacks AVX-512 BF16."""
    ext = _extension()
    return int(ext.few_rows_limit()) if ext is not None else 0


def unregister_packed(key: int) -> None:
    ext = _extension()
    if ext is not None:
        ext.unregister_packed(key)


def supports(dtype: torch.dtype, head_dim: int, device: torch.device) -> bool:
    """Whether `paged_decode_attention` runs for this cache: CPU, float32/bfloat16, whole vectors a head."""
    ext = _extension() if device.type == "cpu" and dtype in DTYPES else None
    return ext is not None and head_dim % ext.vector_width() == 0


def paged_decode_attention(
    q: torch.Tensor,
    key_blocks: torch.Tensor,
    value_blocks: torch.Tensor,
    read_blocks: torch.Tensor,
    mask: torch.Tensor | None,
    width: int,
    scale: float,
) -> torch.Tensor:
    """q [b, H, D] over each row's cached blocks -> [b, H, D] (q's dtype); only where `supports` says so.

    key/value_blocks [blocks, block_size, KVH, D]; read_blocks [b, n] each row's blocks in order;
    mask [b, m >= width] True where the key is attended, or None for every key; keys at `width`
    and past it are not read. The operator llmp_native::paged_decode_attention.
    """
    return torch.ops.llmp_native.paged_decode_attention(q, key_blocks, value_blocks, read_blocks, mask, width, scale)
