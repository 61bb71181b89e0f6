"""Inference engine benchmarks, in-process, against `transformers` measured in the same run.

1. Throughput, equal-length requests at 16 and 64 concurrent, vs `generate` on one static batch
   (>= 0.9x, compiled decode; the eager engine's ratio beside it), `generate` one request at a
   time (>= 5x) and transformers' continuous batching `generate_batch` (>= 3x), both eager.
2. Mixed requests (prompts 16-512, outputs 16-256, arriving over half the time static batches take to
   serve them, measured on the machine) vs the same requests served as static `generate` batches in
   arrival order (>= 1.5x).
3. Batch-1 decode as a fraction of the memory-bandwidth limit (weight bytes read per token over
   the read bandwidth of a large tensor sum) on a >= 100M-parameter model (>= 70%), with compiled
   decode steps (EngineConfig.compile); the eager engine's and generate's fractions beside it, and
   those of the weights alone through F.linear (the floor MKL's GEMV sets on this machine).
4. KV cache on vs off (recomputing the whole sequence each step) at 512 generated tokens on the
   >= 100M model (>= 5x); the off side is timed on a sample of the steps spread over all lengths.
5. Speculative decoding at temperature 0: a draft distilled from the target (>= 1.8x inter-token
   latency, with the acceptance rate) and n-gram prompt lookup on a code-editing prompt (reported).
6. INT8 / INT4 weight-only: bytes per parameter (<= 1.1 / <= 0.6), perplexity change on held-out
   text (<= 2% / <= 10%), batch-1 decode speed vs fp32 on the >= 100M model (>= 1.5x), both
   compiled; the eager ratio beside it.

Models: a 12-layer target Llama trained here on the standard library's source and a 1-layer draft
distilled from it (built once, about 6 minutes on 2 cores, and cached under ~/.cache/llmp-bench: see
inference_models.py); the 100M model has random weights (speed only). The full run takes about
18 minutes after that, of which 9 compile the compiled engines; --quick about 5.
The machine may be shared: ratios within one run are what counts.

Run: python -m bench inference [--quick] [--threads=N]
"""

from __future__ import annotations

import copy
import inspect
import math
import random
import statistics
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, PreTrainedModel

from bench.inference_models import FULL, QUICK, Models, Profile, big_model, trained_models
from services.inference.engine import (
    EngineConfig,
    KVCacheConfig,
    LLMEngine,
    SamplingParams,
    SchedulerConfig,
    create_drafter,
)
from services.inference.engine.drafters import DraftModelDrafter
from services.inference.engine.quantization import quantize

REPEATS = 2


@dataclass
class Row:
    measure: str
    ours: float
    reference: float
    unit: str
    target: float | None  # minimum ratio ours / reference (or maximum, when `at_most`)
    at_most: bool = False
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.ours / self.reference if self.reference else float("nan")

    @property
    def verdict(self) -> str:
        if self.target is None:
            return "report"
        met = self.ratio <= self.target if self.at_most else self.ratio >= self.target
        return "met" if met else "NOT met"


ROWS: list[Row] = []


def record(row: Row) -> None:
    ROWS.append(row)
    target = "" if row.target is None else f" (target {'<=' if row.at_most else '>='} {row.target:g})"
    print(
        f"  {row.measure}: ours {row.ours:.4g} vs {row.reference:.4g} {row.unit} = {row.ratio:.3f}x"
        f"{target} {row.verdict} {row.note}",
        flush=True,
    )


def print_table() -> None:
    header = f"{'measure':<58} {'ours':>10} {'reference':>10} {'ratio':>8} {'target':>8}  result"
    print("\n" + header + "\n" + "-" * len(header))
    for r in ROWS:
        target = "-" if r.target is None else f"{'<=' if r.at_most else '>='}{r.target:g}"
        print(f"{r.measure:<58} {r.ours:>10.4g} {r.reference:>10.4g} {r.ratio:>8.3f} {target:>8}  {r.verdict}")
    print(f"(units and notes above; load average at the end: {load_average()})")


def load_average() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


# -- helpers ----------------------------------------------------------------------------------------
def timed(fn: Callable[..., object], *args: Any, **kwargs: Any) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def engine_for(
    model: PreTrainedModel,
    *,
    kv_mb: int = 64,
    max_seqs: int = 64,
    budget: int = 512,
    compile: bool = False,
    pack: bool = False,
    **kw: Any,
) -> LLMEngine:
    """`pack`: the engine packs the model's weights (EngineConfig.pack_weights), as the service does;
    only for a model nothing else runs afterwards."""
    kv = KVCacheConfig(memory_bytes=kv_mb * 2**20)
    sched = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget)
    config = EngineConfig(kv_cache=kv, scheduler=sched, compile=compile, pack_weights=pack)
    return LLMEngine(model, config, **kw)


def compiled_engine(model: PreTrainedModel) -> tuple[LLMEngine, float]:
    """An engine whose decode steps run compiled (the batch-1 configuration), warmed up: (engine, compile seconds)."""
    engine = engine_for(model, kv_mb=64, compile=True)
    seconds = engine.warm_up()
    assert engine.runner.compiled is not None, "torch.compile failed: see the warning above"
    return engine, seconds


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def engine_decode(engine: LLMEngine, prompt: list[int], n: int) -> tuple[float, list[int], tuple[int, int]]:
    """One request alone -> (seconds per token after the first, tokens, (drafted, accepted))."""
    engine.add_request(prompt, greedy(n))
    first: tuple[float, int] | None = None
    out = None
    while engine.has_unfinished():
        (out,) = engine.step()
        got = len(out.outputs[0].token_ids)
        if got and first is None:
            first = (time.perf_counter(), got)
    assert out is not None and first is not None
    end, total = time.perf_counter(), len(out.outputs[0].token_ids)
    c = out.outputs[0]
    return (end - first[0]) / max(total - first[1], 1), c.token_ids, (c.num_draft_tokens, c.num_accepted_tokens)


def best_of(
    engines: list[LLMEngine], prompt: list[int], n: int, repeats: int = REPEATS
) -> list[tuple[float, list[int], tuple[int, int]]]:
    """`engine_decode` on each engine, `repeats` times interleaved (the machine's load moves in between): the
    fastest run of each."""
    runs = [[engine_decode(engine, prompt, n) for engine in engines] for _ in range(repeats)]
    return [min(column, key=lambda run: run[0]) for column in zip(*runs, strict=True)]


def generate_itl(model: PreTrainedModel, prompt: list[int], n: int) -> float:
    """transformers generate, batch 1, greedy: seconds per token after the first (best of two runs)."""
    ids = torch.tensor([prompt])

    def run(k: int) -> float:
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False)  # type: ignore[operator]
        return time.perf_counter() - start

    run(2)
    return (min(run(n) for _ in range(2)) - min(run(1) for _ in range(2))) / (n - 1)


def windows(models: Models, count: int, length: int, seed: int) -> list[list[int]]:
    """`count` prompts of `length` tokens cut from held-out text."""
    ids = [t for text in models.held_out for t in models.tokenizer.encode(text).ids]
    rng = random.Random(seed)
    return [ids[s : s + length] for s in (rng.randrange(len(ids) - length) for _ in range(count))]


# -- 1. equal-length throughput --------------------------------------------------------------------
def throughput(models: Models, profile: Profile, quick: bool) -> None:
    prompt_len, out_len = (16, 8) if quick else (32, 64)
    reference = models.target
    ours, ours_compiled = copy.deepcopy(reference), copy.deepcopy(reference)
    for concurrency in (4, 8) if quick else (16, 64):
        prompts = windows(models, concurrency, prompt_len, seed=concurrency)
        tokens = concurrency * out_len
        engine = engine_for(ours, kv_mb=256, budget=2048)
        engine.generate(prompts[:2], greedy(4))  # warm-up
        compiled = engine_for(ours_compiled, kv_mb=256, budget=2048, compile=True)
        compile_s = compiled.warm_up()
        batch = torch.tensor(prompts)
        gen = dict(max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False)
        reference.generate(batch[:2], attention_mask=torch.ones_like(batch[:2]), max_new_tokens=4, do_sample=False)
        t_ours, t_compiled, t_static = float("inf"), float("inf"), float("inf")
        for _ in range(REPEATS + 1):  # interleaved, best of each: the machine's load moves in between
            t_ours = min(t_ours, timed(engine.generate, prompts, greedy(out_len)))
            t_compiled = min(t_compiled, timed(compiled.generate, prompts, greedy(out_len)))
            t_static = min(t_static, timed(reference.generate, batch, attention_mask=torch.ones_like(batch), **gen))
        alone = prompts[:4]  # a rate: 4 suffice, each the best of REPEATS runs
        t_alone = sum(min(timed(reference.generate, torch.tensor([p]), **gen) for _ in range(REPEATS)) for p in alone)
        rate = tokens / t_ours
        name = f"throughput {concurrency} concurrent, {prompt_len}+{out_len} tok"
        note = f"(compiled decode; {compile_s:.0f} s to compile)"
        record(Row(f"{name} vs static generate", tokens / t_compiled, tokens / t_static, "tok/s", 0.9, note=note))
        record(Row("  eager engine vs static generate", rate, tokens / t_static, "tok/s", None))
        record(Row(f"{name} vs generate one at a time", rate, len(alone) * out_len / t_alone, "tok/s", 5))
        cb = copy.deepcopy(models.target)
        config = GenerationConfig(max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False, eos_token_id=-1)
        cb.generate_batch(prompts[:2], generation_config=config)  # warm-up (and its own warm-up)
        t_cb = timed(cb.generate_batch, prompts, generation_config=config, warmup=False)
        record(Row(f"{name} vs generate_batch", rate, tokens / t_cb, "tok/s", 3))
        del cb


# -- 2. mixed requests arriving over time ----------------------------------------------------------
def mixed(models: Models, quick: bool) -> None:
    count, batch_size = (6, 3) if quick else (24, 8)
    rng = random.Random(7)
    max_prompt, max_out = (64, 32) if quick else (512, 256)
    lengths = [(rng.randint(16, max_prompt), rng.randint(16, max_out)) for _ in range(count)]
    ids = [t for text in models.held_out for t in models.tokenizer.encode(text).ids]
    starts = [rng.randrange(len(ids) - 512) for _ in lengths]
    prompts = [ids[s : s + p] for s, (p, _) in zip(starts, lengths, strict=True)]
    fractions = sorted(rng.random() for _ in range(count))
    useful = sum(o for _, o in lengths)
    model = models.target

    def static_batch(members: range) -> None:
        width = max(len(prompts[i]) for i in members)
        pad = torch.tensor([[0] * (width - len(prompts[i])) + prompts[i] for i in members])
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in members])
        n = max(lengths[i][1] for i in members)
        model.generate(pad, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)  # type: ignore[operator]

    # The requests arrive over half the time static batches take to serve them back to back (from the
    # first batch, timed here), so the load is the same on any machine. Over a fixed window a fast
    # machine idles between arrivals, and any server finishes just after the last one arrives.
    window = timed(static_batch, range(batch_size)) * count / batch_size / 2
    arrivals = [f * window for f in fractions]

    engine = engine_for(copy.deepcopy(model), kv_mb=256, budget=512)
    engine.generate(prompts[:2], greedy(4))
    start, added = time.perf_counter(), 0
    while added < count or engine.has_unfinished():
        now = time.perf_counter() - start
        while added < count and arrivals[added] <= now:
            engine.add_request(prompts[added], greedy(lengths[added][1]))
            added += 1
        if engine.has_unfinished():
            engine.step()
        else:
            time.sleep(max(0.0, arrivals[added] - now))
    t_ours = time.perf_counter() - start

    start = time.perf_counter()
    for b in range(0, count, batch_size):
        members = range(b, min(b + batch_size, count))
        wait = arrivals[members[-1]] - (time.perf_counter() - start)
        if wait > 0:
            time.sleep(wait)  # a static batch starts once its last request has arrived
        static_batch(members)
    t_static = time.perf_counter() - start
    note = f"({count} requests over {window:.1f} s, static batches of {batch_size}; {t_ours:.1f} s vs {t_static:.1f} s)"
    rates = (useful / t_ours, useful / t_static)
    record(Row("mixed arrivals vs static generate batches", *rates, "tok/s", 1.5, note=note))


# -- 3. batch-1 decode vs memory bandwidth ---------------------------------------------------------
def read_bandwidth(quick: bool) -> float:
    """Bytes per second of a large float32 tensor sum, the best of five."""
    x = torch.ones((2**24 if quick else 2**27,))
    x.sum()
    best = min(timed(x.sum) for _ in range(5))
    return x.numel() * x.element_size() / best


def token_weights(model: PreTrainedModel) -> list[torch.Tensor]:
    """The weights every decoded token reads once: all matrices but the input embedding (one row of it)."""
    embedding = model.get_input_embeddings().weight
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if t is not embedding}
    return [t for t in tensors.values() if t.dim() >= 2]


def weight_bytes_per_token(model: PreTrainedModel) -> int:
    return sum(t.numel() * t.element_size() for t in token_weights(model))


def weights_alone_seconds(model: PreTrainedModel) -> float:
    """One row through every weight a decoded token reads (F.linear each, MKL's GEMV): the floor a
    batch-1 step stands on before attention, norms and the engine. Best of ten passes."""
    weights = token_weights(model)
    rows = {w.shape[1]: torch.randn(1, w.shape[1]) for w in weights}

    def one_pass() -> None:
        for w in weights:
            F.linear(rows[w.shape[1]], w)

    one_pass()
    return min(timed(one_pass) for _ in range(10))


def bandwidth(quick: bool) -> tuple[PreTrainedModel, list[int], int]:
    model = big_model(quick)
    params = sum(p.numel() for p in model.parameters())
    prompt, n = list(range(100, 116)), 16 if quick else 64
    per_token = weight_bytes_per_token(model)
    eager = engine_for(copy.deepcopy(model), kv_mb=64)
    engine_decode(eager, prompt, 4)
    compiled, compile_s = compiled_engine(copy.deepcopy(model))
    # The read bandwidth moves with the machine's load by tens of percent from minute to minute:
    # measured before, between and after the decode runs, the best reading sets the limit.
    readings = [read_bandwidth(quick)]
    itl_generate = generate_itl(model, prompt, n)
    readings.append(read_bandwidth(quick))
    itl_ours, itl_eager = (run[0] for run in best_of([compiled, eager], prompt, n, repeats=3))
    weights_alone = weights_alone_seconds(model)
    readings.append(read_bandwidth(quick))
    bw = max(readings)
    limit = bw / per_token
    note = (
        f"({params / 1e6:.0f}M params fp32, {per_token / 1e6:.0f} MB/token, "
        f"read {bw / 1e9:.2f} GB/s (best of {', '.join(f'{r / 1e9:.1f}' for r in readings)}), "
        f"limit {limit:.1f} tok/s; compiled decode, {compile_s:.0f} s to compile)"
    )
    record(Row("batch-1 decode, fraction of bandwidth limit", 1 / itl_ours / limit, 1.0, "", 0.7, note=note))
    record(Row("  eager engine, fraction of limit", 1 / itl_eager / limit, 1.0, "", None))
    record(Row("  transformers generate, fraction of limit", 1 / itl_generate / limit, 1.0, "", None))
    record(Row("  the weights alone (F.linear, one row), fraction of limit", 1 / weights_alone / limit, 1.0, "", None))
    record(Row("batch-1 decode ours vs the weights alone", 1 / itl_ours, 1 / weights_alone, "tok/s", None))
    record(Row("batch-1 decode ours vs generate", 1 / itl_ours, 1 / itl_generate, "tok/s", None))
    return model, prompt, n


# -- 4. KV cache on vs off -------------------------------------------------------------------------
def kv_on_off(big: PreTrainedModel, prompt: list[int], quick: bool) -> None:
    """On the >= 100M model: on the small target a full recompute costs little more than a cached step.

    With the cache all n tokens are generated and timed. Without it, step i runs the model over all
    len(prompt) + i tokens: the middle step of every run of `stride` steps is timed (on the tokens
    decoded above, which greedy recomputation reproduces) and stands for its run.
    """
    n, stride = (32, 8) if quick else (512, 32)
    engine = engine_for(copy.deepcopy(big), kv_mb=64)
    engine_decode(engine, prompt, 4)
    start = time.perf_counter()
    _, tokens, _ = engine_decode(engine, prompt, n)
    t_on = time.perf_counter() - start
    steps = range(stride // 2, n, stride)
    with torch.inference_mode():
        big(torch.tensor([prompt]), use_cache=False, logits_to_keep=1)  # warm-up
        sampled = sum(timed(big, torch.tensor([prompt + tokens[:i]]), use_cache=False, logits_to_keep=1) for i in steps)
    t_off = sampled * stride
    params = sum(p.numel() for p in big.parameters()) / 1e6
    contexts = f"{len(prompt) + steps[0]}-{len(prompt) + steps[-1]}"
    note = (
        f"({params:.3g}M model, {len(prompt)}-token prompt; on: all {n} steps, {t_on:.1f} s; off: {len(steps)} steps "
        f"timed, 1 in {stride} at contexts {contexts} tokens, {sampled:.1f} s x {stride} = {t_off:.0f} s)"
    )
    record(Row(f"KV cache on vs off, {n} generated tokens", n / t_on, n / t_off, "tok/s", 5, note=note))


# -- 5. speculative decoding -----------------------------------------------------------------------
def code_edit_prompt() -> str:
    source = textwrap.dedent(inspect.getsource(textwrap.TextWrapper._split_chunks))
    source += textwrap.dedent(inspect.getsource(textwrap.TextWrapper._fix_sentence_endings))
    return f"# Rewrite these functions, renaming the variable `chunks` to `pieces`.\n{source}\n# Rewritten:\n"


def speculative(models: Models, quick: bool) -> None:
    n, k = (24, 4) if quick else (128, 4)
    prompts = windows(models, 1 if quick else 3, 128, seed=11)  # the greedy output's predictability varies
    plain = engine_for(copy.deepcopy(models.target), kv_mb=64)
    drafter = DraftModelDrafter(copy.deepcopy(models.draft), num_tokens=k, kv_cache={"memory_bytes": 32 * 2**20})
    spec = engine_for(copy.deepcopy(models.target), kv_mb=64, drafter=drafter)
    engine_decode(plain, prompts[0], 4)
    engine_decode(spec, prompts[0], 4)
    runs = [best_of([plain, spec], prompt, n) for prompt in prompts]  # per prompt: (plain run, speculative run)
    itl_plain = statistics.fmean(p[0] for p, _ in runs)
    itl_spec = statistics.fmean(s[0] for _, s in runs)
    drafted, accepted = sum(s[2][0] for _, s in runs), sum(s[2][1] for _, s in runs)
    same = all(p[1] == s[1] for p, s in runs)
    note = (
        f"(k={k}, {len(prompts)} held-out prompts of 128 tokens, {n} generated each; acceptance {accepted}/{drafted}"
        f" = {accepted / max(drafted, 1):.1%}, outputs {'identical' if same else 'DIFFERENT'})"
    )
    record(Row("speculative, distilled draft: tokens/s", 1 / itl_spec, 1 / itl_plain, "tok/s", 1.8, note=note))

    code = models.tokenizer.encode(code_edit_prompt()).ids
    itl_plain, tokens_plain, _ = engine_decode(plain, code, n)
    lookup = create_drafter({"type": "ngram", "num_tokens": 4})
    ngram = engine_for(copy.deepcopy(models.target), kv_mb=64, drafter=lookup)
    engine_decode(ngram, code, 4)
    itl_ngram, tokens_ngram, (drafted, accepted) = engine_decode(ngram, code, n)
    verdict = "identical" if tokens_ngram == tokens_plain else "DIFFERENT"
    rate = accepted / max(drafted, 1)
    note = f"(code-editing prompt, {len(code)} tokens; acceptance {accepted}/{drafted} = {rate:.1%}, output {verdict})"
    record(Row("speculative, n-gram lookup: tokens/s", 1 / itl_ngram, 1 / itl_plain, "tok/s", None, note=note))


# -- 6. quantisation -------------------------------------------------------------------------------
def perplexity(model: PreTrainedModel, chunks: list[list[int]]) -> float:
    with torch.inference_mode():
        losses = [float(model(torch.tensor([c]), labels=torch.tensor([c])).loss) for c in chunks]
    return math.exp(statistics.fmean(losses))


def quantisation(models: Models, big: PreTrainedModel, prompt: list[int], n: int, quick: bool) -> None:
    chunks = windows(models, 8 if quick else 32, 256, seed=5)
    base_ppl = perplexity(models.target, chunks)
    fp32 = [engine_for(copy.deepcopy(big), kv_mb=64), compiled_engine(copy.deepcopy(big))[0]]
    engine_decode(fp32[0], prompt, 4)
    for method, max_bytes, max_ppl in (("int8", 1.1, 0.02), ("int4", 0.6, 0.10)):
        spec = {"type": method, "lm_head": True}  # the head is a quarter of the 100M model's bytes
        small = copy.deepcopy(models.target)
        report = quantize(small, spec)
        ppl = perplexity(small, chunks)
        whole = f"(whole model incl. fp32 input embeddings: {report.model_bytes_per_parameter:.3f})"
        bpp = report.bytes_per_parameter
        name = f"{method} bytes per parameter (quantised layers)"
        record(Row(name, bpp, 1.0, "B", max_bytes, at_most=True, note=whole))
        record(
            Row(
                f"{method} perplexity vs fp32 (held-out stdlib)",
                ppl,
                base_ppl,
                "ppl",
                1 + max_ppl,
                at_most=True,
                note=f"({len(chunks)} x 256 tokens; change {ppl / base_ppl - 1:+.2%})",
            )
        )
        fast = copy.deepcopy(big)
        quantize(fast, spec)
        eager = engine_for(fast, kv_mb=64)
        engine_decode(eager, prompt, 4)
        compiled, compile_s = compiled_engine(fast)
        # fp32 and quantised, eager and compiled, interleaved: the machine's load moves in between
        runs = best_of([*fp32, eager, compiled], prompt, n, repeats=3)
        itl_fp32, itl_fp32_compiled, itl_eager, itl = (run[0] for run in runs)
        name = f"{method} batch-1 decode vs fp32 (100M+ model)"
        note = f"(compiled decode, both; kernels {report.kernels}; {compile_s:.0f} s to compile)"
        record(Row(name, 1 / itl, 1 / itl_fp32_compiled, "tok/s", 1.5, note=note))
        record(Row(f"  {method} eager engine vs fp32 eager", 1 / itl_eager, 1 / itl_fp32, "tok/s", None))
        del eager, compiled, fast


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[2:] if argv is None else argv
    quick = "--quick" in args
    # --threads=N: on a machine other jobs keep busy, 2 threads stall at every OpenMP barrier
    # (measured: 0.5-0.9 s vs 0.04 s per token of the 7M model at load 7 on 2 cores); 1 avoids it.
    threads = next((int(a.split("=", 1)[1]) for a in args if a.startswith("--threads=")), 2)
    torch.set_num_threads(threads)
    profile = QUICK if quick else FULL
    started = time.perf_counter()
    print(f"inference benchmark ({profile.name}), torch threads {torch.get_num_threads()}, load {load_average()}")
    models = trained_models(profile)
    print("1. throughput, equal-length requests", flush=True)
    throughput(models, profile, quick)
    print("2. mixed requests arriving over time", flush=True)
    mixed(models, quick)
    print("3. batch-1 decode vs memory bandwidth", flush=True)
    big, prompt, n = bandwidth(quick)
    print("4. KV cache on vs off", flush=True)
    kv_on_off(big, prompt, quick)
    print("5. speculative decoding", flush=True)
    speculative(models, quick)
    print("6. quantisation", flush=True)
    quantisation(models, big, prompt, n, quick)
    print_table()
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
