"""Run every benchmark: `python -m bench [name ...]` (make bench).

The process runs as the inference service runs its engines: it starts itself again with tcmalloc and
Intel's OpenMP preloaded where found (services/inference/runtime.py), so an engine's figures are the
service's; a reference measured in the same process runs on the same runtime.
"""

from __future__ import annotations

import importlib
import sys

from services.inference.runtime import reexec_with_preloads

BENCHMARKS = [
    "bench.tokenizer",
    "bench.retrieval",
    "bench.retrieval_eval",
    "bench.inference",
    "bench.inference_serving",
    "bench.vllm_cpu",
    "bench.training",
    "bench.redis_fsync",
    "bench.gateway",
]


def main() -> None:
    reexec_with_preloads()
    names = [a for a in sys.argv[1:] if not a.startswith("-")]  # flags (e.g. --quick) are the benchmarks' own
    chosen = [f"bench.{n}" for n in names] or BENCHMARKS
    for module in chosen:
        importlib.import_module(module).main()


if __name__ == "__main__":
    main()
