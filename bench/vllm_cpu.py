"""Our engine against vLLM's CPU build, on the same model, prompts and machine, in one run.

The model is the inference bench's random ~134M Llama (speed does not depend on the weights'
values), saved as a Hugging Face folder that both engines load. Prompts are token ids, decoding is
greedy with the end token ignored, so both produce exactly the requested number of tokens. Rows,
each in float32 and bfloat16 (target: ours >= 1.0x vLLM at the same dtype):

1. 64 requests, 32 prompt + 64 generated tokens, submitted at once;
2. 16 requests, the same shape;
3. batch 1, 32 prompt + 128 generated tokens;
4. mixed arrivals: 24 requests (prompts 16-512, outputs 16-256) arriving over half the time our
   engine takes to serve them all at once (timed first), the same schedule for both.

vLLM runs in a virtual environment of its own (it pins another transformers): `make vllm-env`
makes `.venv-vllm`, or LLMP_BENCH_VLLM_PYTHON names another interpreter. It is given its
documented best CPU set-up: tcmalloc and Intel OpenMP preloaded, OpenMP threads bound to the
cores we use. Without that environment the section is skipped, saying why.

Run: python -m bench vllm_cpu [--dtype=float32|bfloat16] [--threads=N]
"""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import PreTrainedModel

from bench.inference import Row, engine_for, greedy, load_average, print_table, record, timed
from bench.inference_models import big_model

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "llmp-bench" / "vllm"
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
MAX_MODEL_LEN = 1024
BATCHES = [
    ("64 requests, 32+64 tok", 64, 32, 64),
    ("16 requests, 32+64 tok", 16, 32, 64),
    ("batch 1, 32+128 tok", 1, 32, 128),
]


def vllm_python() -> Path | None:
    named = os.environ.get("LLMP_BENCH_VLLM_PYTHON")
    path = Path(named) if named else ROOT / ".venv-vllm" / "bin" / "python"
    return path if path.exists() else None


def vllm_env(python: Path, threads: int) -> dict[str, str]:
    """vLLM's documented CPU set-up: tcmalloc and Intel OpenMP preloaded, threads bound to our cores."""
    env = dict(os.environ)
    preload = [str(TCMALLOC)] if TCMALLOC.exists() else []
    iomp = python.parent.parent / "lib" / "libiomp5.so"
    if iomp.exists():
        preload.append(str(iomp))
    env["LD_PRELOAD"] = ":".join(preload)
    env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{threads - 1}"
    env["VLLM_CPU_KVCACHE_SPACE"] = "4"  # GiB
    env.pop("PYTHONPATH", None)
    return env


def saved_model() -> tuple[PreTrainedModel, Path]:
    model = big_model(quick=False)
    folder = CACHE / "big-llama"
    if not (folder / "config.json").exists():
        model.save_pretrained(folder)
    return model, folder


def workload(seed: int = 0) -> dict:
    rng = random.Random(seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(3, 32000) for _ in range(n)]

    batches = [
        {"name": name, "prompts": [ids(p) for _ in range(count)], "max_tokens": out} for name, count, p, out in BATCHES
    ]
    lengths = [(rng.randint(16, 512), rng.randint(16, 256)) for _ in range(24)]
    fractions = sorted(rng.random() for _ in lengths)
    mixed = {"prompts": [ids(p) for p, _ in lengths], "max_tokens": [o for _, o in lengths], "fractions": fractions}
    return {"batches": batches, "mixed": mixed}


def ours(model: PreTrainedModel, work: dict) -> tuple[dict[str, float], float, float]:
    """(best seconds per batch, seconds for the mixed arrivals, the arrival window) on our compiled engine."""
    engine = engine_for(model, kv_mb=1024, budget=2048, compile=True)
    engine.warm_up()
    batches = {}
    for batch in work["batches"]:
        prompts, params = batch["prompts"], greedy(batch["max_tokens"])
        batches[batch["name"]] = min(timed(engine.generate, prompts, params) for _ in range(2))
    mixed = work["mixed"]
    window = timed(engine.generate, mixed["prompts"], greedy(max(mixed["max_tokens"]))) / 2
    mixed["arrivals"] = [f * window for f in mixed["fractions"]]
    start, added, count = time.perf_counter(), 0, len(mixed["prompts"])
    while added < count or engine.has_unfinished():
        now = time.perf_counter() - start
        while added < count and mixed["arrivals"][added] <= now:
            engine.add_request(mixed["prompts"][added], greedy(mixed["max_tokens"][added]))
            added += 1
        if engine.has_unfinished():
            engine.step()
        else:
            time.sleep(max(0.0, mixed["arrivals"][added] - now))
    return batches, time.perf_counter() - start, window


def theirs(python: Path, folder: Path, dtype: str, work: dict, threads: int) -> dict:
    request = {"model": str(folder), "dtype": dtype, "max_model_len": MAX_MODEL_LEN, **work}
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        subprocess.run(
            [str(python), str(ROOT / "bench" / "vllm_worker.py"), str(result)],
            input=json.dumps(request),
            text=True,
            check=True,
            env=vllm_env(python, threads),
            cwd=tmp,
        )
        return json.loads(result.read_text())


def compare(model: PreTrainedModel, folder: Path, python: Path, dtype: str, threads: int) -> None:
    work = workload()
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    copied = copy.deepcopy(model)
    torch.nn.Module.to(copied, torch_dtype)  # in place
    our_batches, our_mixed, window = ours(copied, work)
    vllm = theirs(python, folder, dtype, work, threads)
    for name, count, _, out in BATCHES:
        tokens = count * out
        rates = tokens / our_batches[name], tokens / vllm["batches"][name]
        record(Row(f"vs vLLM CPU {dtype}: {name}", *rates, "tok/s", 1.0))
    useful = sum(work["mixed"]["max_tokens"])
    seconds = f"{our_mixed:.1f} s vs {vllm['mixed']:.1f} s"
    note = f"(24 requests over {window:.1f} s; {seconds}; vLLM start {vllm['startup']:.0f} s)"
    rates = useful / our_mixed, useful / vllm["mixed"]
    record(Row(f"vs vLLM CPU {dtype}: mixed arrivals", *rates, "tok/s", 1.0, note=note))


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[2:] if argv is None else argv
    threads = next((int(a.split("=", 1)[1]) for a in args if a.startswith("--threads=")), 2)
    dtypes = [a.split("=", 1)[1] for a in args if a.startswith("--dtype=")] or ["float32", "bfloat16"]
    python = vllm_python()
    if python is None:
        print("vLLM CPU comparison skipped: no vLLM environment (run `make vllm-env`, or set LLMP_BENCH_VLLM_PYTHON)")
        return
    torch.set_num_threads(threads)
    print(f"ours vs vLLM's CPU build ({python}), torch threads {threads}, load {load_average()}", flush=True)
    model, folder = saved_model()
    for dtype in dtypes:
        compare(model, folder, python, dtype, threads)
    print_table()


if __name__ == "__main__":
    main()
