"""Run every benchmark: `python -m bench [name ...]` (make bench)."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = ["bench.tokenizer", "bench.retrieval", "bench.retrieval_eval"]


def main() -> None:
    chosen = [f"bench.{n}" for n in sys.argv[1:]] or BENCHMARKS
    for module in chosen:
        importlib.import_module(module).main()


if __name__ == "__main__":
    main()
