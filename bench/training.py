"""Training benchmarks, each against a reference measured in the same run, printed as ratios.

The same Llama (RoPE, GQA, SwiGLU, RMSNorm; `transformers`' LlamaForCausalLM), the same packed
token rows of the Python standard library's source, the same micro-batches and AdamW, trained:

1. by a plain PyTorch loop in a fresh process — the reference;
2. through Ray Train (TorchTrainer, 1 worker) — target >= 0.9x the plain loop's tokens/s, both with
   half the cores' threads, so that Ray's own processes (raylet, GCS, the Train controller and its
   helper actors: about a tenth of a core) have room, as on any node that runs them. The same pair
   with every core's threads is reported beside it: there each wake-up of Ray's processes stalls
   the step's lock-step intra-op threads. 1 and 2 alternate (ROUNDS of each, Ray started and shut
   down around each Ray run); the best of each counts;
3. through Ray Train with 2 workers under DDP, each with half the cores' threads: against 1 worker
   with half (the scaling efficiency of doubling the hardware) and against 1 worker with all of
   them (data parallelism against intra-op threads on the same cores).

Model FLOPs utilisation: 6 x parameters (+ attention's 12 x layers x hidden x seq) per token times
tokens/s, over the fp32 matmul rate `torch.mm` reaches at the model's own shapes, in this run, with
the run's threads.
Loss curves (every LOG_EVERY steps) are printed for each run.

4. alignment (bench/training_alignment.py): SFT (full and LoRA), DPO and PPO steps on the same model,
   in tokens/s against the plain loop's at every core's threads, and PPO's share of time spent
   generating rollouts against training on them.

Run: python -m bench training [--quick] [--threads=N] [--alignment]
(--threads: all the intra-op threads a run may use, default all cores; "half" is N // 2;
--alignment: only the plain loop and the alignment rows.)
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM

from bench import training_alignment
from libs.common import corpora

QUICK = "--quick" in sys.argv or os.environ.get("LLMP_BENCH_QUICK") == "1"
ALIGNMENT_ONLY = "--alignment" in sys.argv
THREADS = next((int(a.split("=", 1)[1]) for a in sys.argv if a.startswith("--threads=")), os.cpu_count() or 1)
VOCAB = 4096
SEQ = 128 if QUICK else 256
MICRO_BATCH = 4 if QUICK else 8
WARMUP_STEPS = 2 if QUICK else 3
STEPS = 6 if QUICK else 24
HALF = max(1, THREADS // 2)
ROUNDS = 1 if QUICK else 3  # plain loop, then Ray, alternating: the best of each counts
WINDOWS = 3  # the timed steps in equal windows: the fastest window's rate counts (the machine's load moves)
LOG_EVERY = 2 if QUICK else 4
MODEL = dict(hidden_size=128 if QUICK else 256, num_hidden_layers=2 if QUICK else 4, num_attention_heads=4)


def model_config() -> LlamaConfig:
    hidden = MODEL["hidden_size"]
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=MODEL["num_hidden_layers"],
        num_attention_heads=MODEL["num_attention_heads"],
        num_key_value_heads=2,
        intermediate_size=int(hidden * 8 / 3) // 64 * 64,
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
    )


def token_rows() -> tuple[torch.Tensor, Tokenizer]:
    """Packed (rows, SEQ) tokens of stdlib source under a byte-level BPE trained here, and the BPE."""
    texts = [text for _, text in corpora.stdlib_source(limit=60 if QUICK else 300)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"]))
    ids = [t for e in tokenizer.encode_batch(texts) for t in [*e.ids, 0]]
    usable = len(ids) // SEQ * SEQ
    return torch.tensor(ids[:usable]).view(-1, SEQ), tokenizer


def settings(rows: torch.Tensor, workers: int, threads: int, in_ray: bool) -> dict[str, Any]:
    """Everything a run needs, passed explicitly: Ray's workers do not see this process's flags."""
    return {
        "rows": rows,
        "model": model_config().to_dict(),
        "ray": in_ray,
        "threads": threads,
        "global_batches": workers,
        "warmup": WARMUP_STEPS,
        "steps": STEPS,
        "windows": WINDOWS,
        "micro_batch": MICRO_BATCH,
        "log_every": LOG_EVERY,
    }


def train(config: dict[str, Any]) -> dict[str, Any]:
    """Train for WARMUP_STEPS + STEPS; tokens/s of the fastest of WINDOWS windows of the timed steps and
    over all of them, and the loss curve.

    Runs as is (the plain loop) or as a Ray Train worker's body, where the model is wrapped for DDP
    and each worker takes its own rows of every step's batch.
    """
    torch.set_num_threads(config["threads"])
    rows: torch.Tensor = config["rows"]
    warmup, steps, micro, log_every = config["warmup"], config["steps"], config["micro_batch"], config["log_every"]
    in_ray = config["ray"]
    rank, world = 0, 1
    torch.manual_seed(0)
    model: torch.nn.Module = LlamaForCausalLM(LlamaConfig.from_dict(config["model"]))
    if in_ray:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        rank, world = context.get_world_rank(), context.get_world_size()
        model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    losses: list[tuple[int, float]] = []
    window = steps // config["windows"]
    marks: list[float] = []  # time at the start of each window, and at the end
    for step in range(warmup + steps):
        if step >= warmup and (step - warmup) % window == 0:
            marks.append(time.perf_counter())
        order = torch.randint(0, len(rows), (micro * config["global_batches"],), generator=gen)
        batch = rows[order[rank::world]]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == warmup + steps - 1:
            losses.append((step, loss.item()))
    marks.append(time.perf_counter())
    tokens_per_step = micro * config["global_batches"] * rows.shape[1]
    windows = [window * tokens_per_step / (b - a) for a, b in itertools.pairwise(marks)]
    result = {
        "tokens_per_second": max(windows[: config["windows"]]),
        "mean_tokens_per_second": steps * tokens_per_step / (marks[-1] - marks[0]),
        "losses": losses,
    }
    if in_ray and rank == 0:
        Path(config["out"]).write_text(json.dumps(result))
    return result


def ray_worker(config: dict[str, Any]) -> None:
    """`train` as a Ray Train worker's body: rank 0 writes the result where the driver reads it."""
    train(config)


def through_ray(rows: torch.Tensor, workers: int, threads: int, storage: str) -> dict[str, Any]:
    """Train on `workers` Ray Train workers of `threads` intra-op threads each."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = settings(rows, workers, threads, in_ray=True) | {"out": f"{storage}/result-{workers}-{threads}.json"}
    trainer = TorchTrainer(
        ray_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"bench-{workers}-{threads}", storage_path=storage),
    )
    trainer.fit()
    return json.loads(Path(config["out"]).read_text())


def fresh(fn: Any, *args: Any) -> Any:
    """fn(*args) in a new process of its own."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def matmul_rate(threads: int) -> float:
    """fp32 FLOP/s of torch.mm at the MLP's shapes (the largest matmuls of a step), best of 5."""
    torch.set_num_threads(threads)
    hidden = MODEL["hidden_size"]
    a, b = torch.randn(MICRO_BATCH * SEQ, hidden), torch.randn(hidden, int(hidden * 8 / 3) // 64 * 64)
    torch.mm(a, b)
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(10):
            torch.mm(a, b)
        best = max(best, 10 * 2 * a.shape[0] * a.shape[1] * b.shape[1] / (time.perf_counter() - start))
    return best


def flops_per_token(config: LlamaConfig) -> float:
    params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    return 6 * params + 12 * config.num_hidden_layers * config.hidden_size * SEQ


def curve(losses: list[tuple[int, float]]) -> str:
    return " ".join(f"{step}:{loss:.2f}" for step, loss in losses)


def main() -> None:
    import ray

    cores = os.cpu_count() or 1
    kind = "quick" if QUICK else "full"
    print(f"training benchmarks ({kind}; {cores} cores, {THREADS} threads, load {os.getloadavg()[0]:.1f}):")
    rows, tokenizer = token_rows()
    config = model_config()
    per_token = flops_per_token(config)
    params = (per_token - 12 * config.num_hidden_layers * config.hidden_size * SEQ) / 6
    print(f"  model {params / 1e6:.1f}M parameters, {len(rows)} rows of {SEQ} tokens, micro-batch {MICRO_BATCH}")

    # The reference loop and the matmul rates run in fresh processes, one each, as every Ray run gets
    # a fresh worker: the tokenizer trained here leaves thread pools in this process, and a process
    # that ran with other thread counts keeps their pools. The plain loop and the 1-worker Ray run
    # alternate, ROUNDS of each with Ray shut down between, and the best of each counts: the
    # machine's load drifts by more than the difference measured.
    if ALIGNMENT_ONLY:
        reference = fresh(train, settings(rows, 1, THREADS, in_ray=False))["tokens_per_second"]
        training_alignment.show(
            fresh(training_alignment.measure, tokenizer, config, MICRO_BATCH, SEQ, THREADS), reference
        )
        return
    counts = sorted({HALF, THREADS})
    plains: dict[int, list[dict[str, Any]]] = {n: [] for n in counts}
    ones: dict[int, list[dict[str, Any]]] = {n: [] for n in counts}
    two = None
    peaks = {n: fresh(matmul_rate, n) for n in counts}
    with tempfile.TemporaryDirectory() as storage:
        for r in range(ROUNDS):
            for n in counts:
                plains[n].append(fresh(train, settings(rows, 1, n, in_ray=False)))
                ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False)
                try:
                    ones[n].append(through_ray(rows, 1, n, str(Path(storage) / str(r))))
                    if r == ROUNDS - 1 and n == HALF and THREADS >= 2:
                        two = through_ray(rows, 2, HALF, str(Path(storage) / str(r)))
                finally:
                    ray.shutdown()
    plain = {n: max(runs, key=lambda run: run["tokens_per_second"]) for n, runs in plains.items()}
    one = {n: max(runs, key=lambda run: run["tokens_per_second"]) for n, runs in ones.items()}

    def show(label: str, ours: float, reference: float, target: str = "") -> None:
        print(f"  {label:56} {ours:9.0f} vs {reference:9.0f} tokens/s   ratio {ours / reference:.3f}  {target}")

    window = STEPS // WINDOWS
    print(
        f"  (tokens/s: the fastest of {WINDOWS} windows of {window} steps, best of {ROUNDS} alternating rounds; "
        f'"over all steps": all {STEPS} of them)'
    )
    for n in counts:
        pairs = [(p["tokens_per_second"], o["tokens_per_second"]) for p, o in zip(plains[n], ones[n], strict=True)]
        rounds = ", ".join(f"{p:.0f} / {o:.0f} = {o / p:.2f}" for p, o in pairs)
        print(f"  rounds at {n} threads, plain / Ray 1 worker: {rounds}")
    for n in counts:
        label = f"Ray Train (1 worker) vs plain loop, {n} thread{'s' * (n > 1)} each"
        target = ">= 0.9" if n == HALF else "(report: every core)"
        show(label, one[n]["tokens_per_second"], plain[n]["tokens_per_second"], target)
        show("  over all steps", one[n]["mean_tokens_per_second"], plain[n]["mean_tokens_per_second"])
    runs = [(f"plain, {n} threads", plain[n], peaks[n]) for n in counts]
    runs += [(f"ray 1 worker, {n} threads", one[n], peaks[n]) for n in counts]
    if two is not None:
        show(
            f"Ray Train 2 workers x {HALF} vs 1 worker x {HALF} threads",
            two["tokens_per_second"],
            one[HALF]["tokens_per_second"],
        )
        efficiency = two["tokens_per_second"] / (2 * one[HALF]["tokens_per_second"])
        print(f"  scaling efficiency of 2 workers (twice the cores of 1): {efficiency:.1%}")
        show(
            f"Ray Train 2 workers x {HALF} vs 1 worker x {THREADS} threads (same cores)",
            two["tokens_per_second"],
            one[THREADS]["tokens_per_second"],
        )
        runs.append((f"ray 2 workers x {HALF}", two, peaks[THREADS]))
    for label, run, peak in runs:
        mfu = run["tokens_per_second"] * per_token / peak
        print(f"  MFU {label:26} {mfu:6.1%} of the matmul rate at its threads, {peak / 1e9:.1f} GFLOP/s")
    for label, run, _ in runs:
        print(f"  loss curve {label:26} {curve(run['losses'])}")
    alignment = fresh(training_alignment.measure, tokenizer, config, MICRO_BATCH, SEQ, THREADS)
    training_alignment.show(alignment, plain[THREADS]["tokens_per_second"])


if __name__ == "__main__":
    main()
