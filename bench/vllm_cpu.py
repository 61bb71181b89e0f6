"""Our engine against vLLM's CPU build, on the same model, prompts and machine, in one run.

The model is the inference bench's random ~134M Llama (head_dim 64; speed does not depend on the
weights' values), saved as a Hugging Face folder that both engines load. Prompts are token ids,
decoding is greedy with the end token ignored, so both produce exactly the requested number of
tokens. Rows, each in float32 and bfloat16 (target: ours >= 1.0x vLLM at the same dtype):

1. 64 requests, 32 prompt + 64 generated tokens, submitted at once;
2. 16 requests, the same shape;
3. batch 1, 32 prompt + 128 generated tokens;
4. mixed arrivals: 24 requests (prompts 16-512, outputs 16-256) arriving over half the time our
   engine takes to serve them all at once (timed first), the same schedule for both.

Both engines stay loaded side by side (vLLM in a process of its own) and every timing alternates
between them, ours then vLLM's, row by row and repeat by repeat: this shared machine's speed drifts
by 10-25% over minutes, which timing all of one engine and then all of the other put into the ratios.

`--quick` keeps the rows but shortens them (16 generated tokens a request, 32 at batch 1, 8 mixed
requests, one timing each), a few minutes in all; the figures to quote come from the full run.

vLLM runs in a virtual environment of its own (it pins another transformers): `make vllm-env`
makes `.venv-vllm`, or LLMP_BENCH_VLLM_PYTHON names another interpreter. It is given its
documented best CPU set-up: tcmalloc and Intel OpenMP preloaded (where found), OpenMP threads
bound to the cores we use, no core reserved for its front end. Ours runs as the service runs it,
with the preloads of services/inference/runtime.py (bench/__main__.py). Where that environment is missing
or vLLM fails to start, the section is skipped, saying why.

Run: python -m bench vllm_cpu [--quick] [--dtype=float32|bfloat16] [--threads=N]
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
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from bench.inference import Row, engine_for, greedy, load_average, print_table, record, timed
from bench.inference_models import big_model
from services.inference import runtime

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "llmp-bench" / "vllm"
MAX_MODEL_LEN = 1024


@dataclass(frozen=True)
class Shape:
    batches: list[tuple[str, int, int, int]]  # (row name, requests, prompt tokens, generated tokens)
    mixed_requests: int
    mixed_prompt: int  # prompt lengths 16..mixed_prompt
    mixed_output: int  # output lengths 16..mixed_output
    repeats: int  # timings per batch; the best is kept


FULL = Shape(
    batches=[
        ("64 requests, 32+64 tok", 64, 32, 64),
        ("16 requests, 32+64 tok", 16, 32, 64),
        ("batch 1, 32+128 tok", 1, 32, 128),
    ],
    mixed_requests=24,
    mixed_prompt=512,
    mixed_output=256,
    repeats=2,
)
QUICK = Shape(
    batches=[
        ("64 requests, 32+16 tok", 64, 32, 16),
        ("16 requests, 32+16 tok", 16, 32, 16),
        ("batch 1, 32+32 tok", 1, 32, 32),
    ],
    mixed_requests=8,
    mixed_prompt=128,
    mixed_output=64,
    repeats=1,
)


def vllm_python() -> Path | None:
    named = os.environ.get("LLMP_BENCH_VLLM_PYTHON")
    path = Path(named) if named else ROOT / ".venv-vllm" / "bin" / "python"
    return path if path.exists() else None


def unusable(python: Path) -> str | None:
    """Why vLLM cannot run from `python`, or None where it imports."""
    probe = subprocess.run(
        [str(python), "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=tempfile.gettempdir(),
    )
    if probe.returncode:
        return (probe.stderr.strip().splitlines() or ["no output"])[-1]
    return None


def clean_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # our checkout must not shadow vLLM's transformers
    return env


def preloads(python: Path) -> list[str]:
    """tcmalloc and Intel OpenMP (PyPI's intel-openmp, in vLLM's venv), found as our engines find theirs."""
    return runtime.preloads(python.parent.parent)


def vllm_env(python: Path, threads: int) -> dict[str, str]:
    """vLLM's documented CPU set-up: tcmalloc and Intel OpenMP preloaded, threads bound to our cores."""
    env = clean_env()
    env["LD_PRELOAD"] = ":".join(preloads(python))
    env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{threads - 1}"
    env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    env["VLLM_CPU_KVCACHE_SPACE"] = "4"  # GiB
    return env


def saved_model() -> tuple[PreTrainedModel, Path]:
    model = big_model(quick=False)
    folder = CACHE / "big-llama"
    if not (folder / "config.json").exists():
        model.save_pretrained(folder)
    return model, folder


def workload(shape: Shape, seed: int = 0) -> dict:
    rng = random.Random(seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(3, 32000) for _ in range(n)]

    batches = [
        {"name": name, "prompts": [ids(p) for _ in range(count)], "max_tokens": out}
        for name, count, p, out in shape.batches
    ]
    lengths = [
        (rng.randint(16, shape.mixed_prompt), rng.randint(16, shape.mixed_output)) for _ in range(shape.mixed_requests)
    ]
    fractions = sorted(rng.random() for _ in lengths)
    mixed = {"prompts": [ids(p) for p, _ in lengths], "max_tokens": [o for _, o in lengths], "fractions": fractions}
    return {"batches": batches, "mixed": mixed, "repeats": shape.repeats}


class Ours:
    """Our compiled engine, as the service runs it, timing one row at a time."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.engine = engine_for(model, kv_mb=1024, budget=2048, compile=True, pack=True)
        print(f"  {model.dtype}: our engine compiled its decode steps in {self.engine.warm_up():.0f} s", flush=True)

    def time(self, row: dict) -> float:
        """Seconds to serve the row: a batch at once, or (with `arrivals`) requests arriving over time."""
        if "arrivals" not in row:
            return timed(self.engine.generate, row["prompts"], greedy(row["max_tokens"]))
        engine, arrivals = self.engine, row["arrivals"]
        start, added, count = time.perf_counter(), 0, len(row["prompts"])
        while added < count or engine.has_unfinished():
            now = time.perf_counter() - start
            while added < count and arrivals[added] <= now:
                engine.add_request(row["prompts"][added], greedy(row["max_tokens"][added]))
                added += 1
            if engine.has_unfinished():
                engine.step()
            else:
                time.sleep(max(0.0, arrivals[added] - now))
        return time.perf_counter() - start


def vllm_log(dtype: str) -> Path:
    return CACHE / f"vllm-{dtype}.log"


class Theirs:
    """vLLM in its own environment and process (bench/vllm_worker.py), timing one row at a time."""

    def __init__(self, python: Path, folder: Path, dtype: str, threads: int) -> None:
        self.log_path = vllm_log(dtype)
        self.log = self.log_path.open("w")
        read, write = os.pipe()
        self.process = subprocess.Popen(
            [str(python), str(ROOT / "bench" / "vllm_worker.py"), str(write)],
            stdin=subprocess.PIPE,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            text=True,
            env=vllm_env(python, threads),
            cwd=tempfile.gettempdir(),
            pass_fds=(write,),
        )
        os.close(write)
        self.answers = os.fdopen(read)
        self.startup = self._ask({"model": str(folder), "dtype": dtype, "max_model_len": MAX_MODEL_LEN})["startup"]

    def _ask(self, request: dict) -> dict:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.answers.readline()
        if not line:  # the worker ended: it failed
            code = self.process.wait()
            tail = self.log_path.read_text().strip().splitlines()[-5:]
            raise RuntimeError(f"vLLM exited with {code} (log {self.log_path}):\n    " + "\n    ".join(tail))
        return json.loads(line)

    def time(self, row: dict) -> float:
        """Seconds to serve the row, as Ours.time (the worker tells the kinds apart by `arrivals` too)."""
        return float(self._ask(row)["seconds"])

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.answers.close()
        self.log.close()


def compare(model: PreTrainedModel, folder: Path, python: Path, dtype: str, threads: int, shape: Shape) -> None:
    """Both engines loaded side by side, each row timed on one then the other (the machine's speed
    drifts over minutes: alternating keeps that drift out of the ratio); each engine idles, its
    threads asleep, while the other one runs."""
    work = workload(shape)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    print(f"  {dtype}: vLLM starting (its log: {vllm_log(dtype)})", flush=True)
    try:
        theirs = Theirs(python, folder, dtype, threads)
    except RuntimeError as e:
        print(f"  vs vLLM CPU {dtype}: skipped: {e}", flush=True)
        return
    try:
        copied = copy.deepcopy(model)
        torch.nn.Module.to(copied, torch_dtype)  # in place
        ours = Ours(copied)
        engines: tuple[Ours | Theirs, ...] = (ours, theirs)
        for batch in work["batches"]:
            best = [float("inf"), float("inf")]
            for _ in range(work["repeats"]):
                for i, engine in enumerate(engines):
                    time.sleep(SETTLE)
                    best[i] = min(best[i], engine.time(batch))
            tokens = len(batch["prompts"]) * batch["max_tokens"]
            record(Row(f"vs vLLM CPU {dtype}: {batch['name']}", tokens / best[0], tokens / best[1], "tok/s", 1.0))
        mixed = work["mixed"]
        window = ours.time({"prompts": mixed["prompts"], "max_tokens": max(mixed["max_tokens"])}) / 2
        row = {**mixed, "arrivals": [f * window for f in mixed["fractions"]]}
        del row["fractions"]
        seconds = []
        for engine in engines:
            time.sleep(SETTLE)
            seconds.append(engine.time(row))
        useful = sum(mixed["max_tokens"])
        note = (
            f"({len(mixed['prompts'])} requests over {window:.1f} s; {seconds[0]:.1f} s vs {seconds[1]:.1f} s; "
            f"vLLM start {theirs.startup:.0f} s)"
        )
        rates = useful / seconds[0], useful / seconds[1]
        record(Row(f"vs vLLM CPU {dtype}: mixed arrivals", *rates, "tok/s", 1.0, note=note))
    except RuntimeError as e:
        print(f"  vs vLLM CPU {dtype}: stopped: {e}", flush=True)
    finally:
        theirs.close()


SETTLE = 1.0
"""Seconds between two timings, so that the engine just timed has its OpenMP threads asleep (Intel
OpenMP spins 200 ms by default after a parallel region) before the other starts."""


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[2:] if argv is None else argv
    threads = next((int(a.split("=", 1)[1]) for a in args if a.startswith("--threads=")), 2)
    dtypes = [a.split("=", 1)[1] for a in args if a.startswith("--dtype=")] or ["float32", "bfloat16"]
    shape = QUICK if "--quick" in args else FULL
    python = vllm_python()
    if python is None:
        print("vLLM CPU comparison skipped: no vLLM environment (run `make vllm-env`, or set LLMP_BENCH_VLLM_PYTHON)")
        return
    reason = unusable(python)
    if reason is not None:
        print(f"vLLM CPU comparison skipped: vLLM does not import from {python}: {reason}")
        return
    torch.set_num_threads(threads)
    CACHE.mkdir(parents=True, exist_ok=True)
    print(
        f"ours vs vLLM's CPU build ({python}), torch threads {threads}, vLLM preloads {preloads(python) or 'none'}, "
        f"load {load_average()}",
        flush=True,
    )
    model, folder = saved_model()
    for dtype in dtypes:
        compare(model, folder, python, dtype, threads, shape)
    print_table()


if __name__ == "__main__":
    main()
