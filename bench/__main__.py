"""Run every benchmark: `python -m bench [name ...]` (make bench)."""

from __future__ import annotations

import importlib
import sys

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
    names = [a for a in sys.argv[1:] if not a.startswith("-")]  # flags (e.g. --quick) are the benchmarks' own
    chosen = [f"bench.{n}" for n in names] or BENCHMARKS
    for module in chosen:
        importlib.import_module(module).main()


if __name__ == "__main__":
    main()
