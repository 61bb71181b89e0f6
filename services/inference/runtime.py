"""The native runtime of a process that runs an engine: tcmalloc and Intel's OpenMP, preloaded where found.

PyTorch's CPU build allocates with glibc's malloc and runs its parallel loops on GNU OpenMP. For
the engine's many small per-step tensors and its two-to-a-few-thread matmuls both cost: with
tcmalloc and Intel's OpenMP preloaded, bench/vllm_cpu's 134M Llama in float32 on two cores (an
AVX-512 EPYC) generated 16 requests at 376 tokens/s instead of 293, one at 40.7 instead of 35.2,
64 at 446 instead of 413 (tcmalloc gives most at one and 64 rows, Intel's OpenMP at 16). It is
vLLM's documented CPU set-up too, and no user should have to know it.

Both are found, not required: tcmalloc is Debian's `libtcmalloc-minimal4` (or any tcmalloc the
loader finds), Intel's OpenMP the `intel-openmp` wheel, which the inference extra installs on
x86-64 Linux into the environment's lib/. A library can only be preloaded at process start, so

- the inference service's own process, when it runs engines itself (the local backend), starts
  itself again with LD_PRELOAD set (`reexec_with_preloads`, before anything is loaded);
- Ray Serve replicas get LD_PRELOAD in their runtime_env (serve_app.replica_env), so the worker
  processes Ray starts for them load the libraries;
- `cpu_preload: false` in the inference config (LLMP_INFERENCE_CPU_PRELOAD=false) turns it off.
"""

from __future__ import annotations

import ctypes.util
import functools
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

MARK = "LLMP_PRELOADED"
"""Set in a process started again with the preloads, so it never starts itself a second time."""


@functools.cache
def preloads(prefix: Path = Path(sys.prefix)) -> list[str]:
    """The libraries to preload, in order (allocator first), as the loader accepts them; [] where none is found.

    `prefix`: the Python environment whose intel-openmp wheel to use (default: this one's).
    """
    found = []
    allocator = next(filter(None, (ctypes.util.find_library(n) for n in ("tcmalloc_minimal", "tcmalloc"))), None)
    if allocator:
        found.append(allocator)
    iomp = prefix / "lib" / "libiomp5.so"  # the intel-openmp wheel's place in an environment
    if iomp.is_file():
        found.append(str(iomp))
    return found


def named(env: Mapping[str, str]) -> list[str]:
    """The libraries `env`'s LD_PRELOAD names (the loader takes colons or spaces between them)."""
    return [p for p in env.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p]


def with_preloads(env: Mapping[str, str], libraries: list[str]) -> dict[str, str]:
    """`env` with `libraries` first in its LD_PRELOAD (the ones it already names kept, none twice)."""
    merged = [*libraries, *(p for p in named(env) if p not in libraries)]
    out = dict(env)
    if merged:
        out["LD_PRELOAD"] = ":".join(merged)
    return out


def preload_env() -> dict[str, str]:
    """The environment variables a new engine process (a Serve replica) needs: {} where nothing is found."""
    return with_preloads({}, preloads())


def reexec_with_preloads() -> None:
    """Start this process again with the preloads when some are found and LD_PRELOAD lacks them; else return.

    Call before the process starts threads or opens anything a new image would not inherit.
    """
    libraries = preloads()
    if set(libraries) <= set(named(os.environ)) or os.environ.get(MARK) or not sys.platform.startswith("linux"):
        return
    env = with_preloads(os.environ, libraries)
    env[MARK] = "1"
    log.info("starting again with %s preloaded", env["LD_PRELOAD"])
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
