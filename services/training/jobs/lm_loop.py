"""The training loop each Ray Train worker runs for the language-model jobs, and `fit`, which starts it.

What is trained is an `Objective`: it builds the model on each worker, gives the loss of a
micro-batch of packed token rows and the held-out sums it is judged by. Causal-LM pretraining,
masked-LM pretraining, distillation and each model of a scaling sweep are objectives over this
one loop.

Every worker holds a full replica (DDP through `ray.train.torch.prepare_model`) and reads its own
rows of the packed data. One optimiser step is `grad_accum_steps` micro-batches of
`micro_batch_size` sequences per worker, so a step sees
`grad_accum_steps * micro_batch_size * num_workers * seq_len` tokens; gradients are all-reduced
only on the last micro-batch. The learning rate warms up linearly, then follows a cosine down to
`min_lr_ratio` of its peak.

Rank 0 reports progress (step, loss, tokens/s, ETA) to the job store, writes a checkpoint every
`checkpoint_every` steps together with the held-out loss, and the finished model at the end. It
also reads the job's stop request each step and shares it with the other ranks, so all stop at the
same step, after a checkpoint. A restarted worker group (`FailureConfig`) or a resumed job starts
from the latest checkpoint; the sampling order (and an objective's randomness, seeded by the
position in the stream) depends only on the step, so it carries on exactly.

A run's files live under `checkpoints/<run_id>/` (run_id is the job id, or `<job_id>/<part>` for
a job that trains several models): step checkpoints, `final/` (the model as a Hugging Face
folder) and `final.json` (its held-out metrics), which `fit` returns (see `workers`).
"""

from __future__ import annotations

import contextlib
import math
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from llmp.tokenizer.v1.tokenizer_pb2 import TokenizerInfo
from torch.nn.parallel import DistributedDataParallel
from transformers import LlamaConfig, LlamaForCausalLM, get_cosine_with_min_lr_schedule_with_warmup

from services.training import checkpoints
from services.training.checkpoints import TrainState
from services.training.dataprep import load_packed
from services.training.dataprep.stage import require
from services.training.jobs import JobContext, LoopSettings, sharding
from services.training.jobs.registration import NewModel, register
from services.training.jobs.workers import WorkerRun, run_on_workers
from services.training.jobstore import JobRecord, JobStore

Sums = dict[str, tuple[float, float]]
"""Held-out results of one batch: name -> (sum, count); the loop adds them over batches and workers."""


@dataclass(kw_only=True)
class LoopConfig(LoopSettings):
    """The training loop's settings, shared by every job over `lm_loop` (and the only part its workers see)."""

    seq_len: int = 256
    """Tokens per training sequence."""
    fsdp: bool = False
    """Shard parameters, gradients and optimiser state over the workers (FSDP) instead of replicating them
    (DDP); needs GPU workers (use_gpu)."""

    def __post_init__(self) -> None:
        self.check_loop()
        require(self.seq_len >= 1, "must be >= 1", "seq_len")
        require(not self.fsdp or self.use_gpu, "FSDP shards over GPU workers (NCCL): set use_gpu", "fsdp")

    def loop(self) -> LoopConfig:
        """Only the loop's settings, as the workers get them."""
        return LoopConfig(**{f.name: getattr(self, f.name) for f in fields(LoopConfig)})


class Objective(ABC):
    """What a job trains. Built on the driver (small, picklable), used on every worker."""

    @abstractmethod
    def build(self) -> torch.nn.Module:
        """The model to train (a transformers PreTrainedModel), built on the worker; load frozen helpers here."""

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: torch.Tensor, position: int) -> torch.Tensor:
        """Training loss of a micro-batch; `position` (its first row in the stream) seeds any randomness."""

    @abstractmethod
    def heldout(self, model: torch.nn.Module, batch: torch.Tensor) -> Sums:
        """Held-out sums of a batch; "loss" is the one logged at checkpoints."""

    def metrics(self, heldout: dict[str, float]) -> dict[str, float]:
        """The finished model's metrics from the held-out means."""
        return {f"eval_{name}": value for name, value in heldout.items()}


class CausalLM(Objective):
    """Next-token prediction with a Llama model (pretraining, and each model of a sweep)."""

    def __init__(self, config: LlamaConfig) -> None:
        self.config = config.to_dict()

    def build(self) -> torch.nn.Module:
        return LlamaForCausalLM(LlamaConfig.from_dict(self.config))

    def loss(self, model: torch.nn.Module, batch: torch.Tensor, position: int) -> torch.Tensor:
        loss: torch.Tensor = model(input_ids=batch, labels=batch).loss
        return loss

    def heldout(self, model: torch.nn.Module, batch: torch.Tensor) -> Sums:
        return {"loss": (model(input_ids=batch, labels=batch).loss.item() * len(batch), len(batch))}

    def metrics(self, heldout: dict[str, float]) -> dict[str, float]:
        return {"eval_loss": heldout["loss"], "perplexity": math.exp(min(heldout["loss"], 50.0))}


@dataclass(frozen=True)
class Span:
    """Where one run sits in its job's progress: a sweep's models report one count of steps."""

    first_step: int = 0
    """Steps of the job done before this run."""
    total_steps: int = 0
    """Steps of the whole job; 0: this run's max_steps."""
    later_steps: float = 0.0
    """Work left after this run, in steps of this run (for the ETA)."""


def fit(
    job: JobRecord,
    context: JobContext,
    dataset: Path,
    objective: Objective,
    loop: LoopConfig,
    run_id: str = "",
    span: Span = Span(),
) -> dict[str, float] | None:
    """Run `train_loop` on the job's Ray Train workers; the final metrics, or None if it stopped early."""
    settings = {"loop": asdict(loop), "objective": objective, "span": asdict(span)}
    return run_on_workers(job, context, train_loop, dataset, settings, loop.num_workers, loop.use_gpu, run_id)


def train_and_register(
    job: JobRecord,
    context: JobContext,
    dataset: Path,
    objective: Objective,
    cfg: Any,
    info: TokenizerInfo,
    parameters: int,
    parent: str = "",
) -> str:
    """Run the objective on Ray Train, then register the model under cfg.model_name; DONE or the stop asked for.

    `cfg` is a job's config: DataConfig and LoopConfig settings and a model_name.
    """
    stop = context.store.stop_requested(job.job_id)
    if stop:
        return stop
    metrics = fit(job, context, dataset, objective, cfg.loop())
    model = NewModel(
        name=cfg.model_name,
        tokenizer=info.ref,
        tokenizer_files=context.artifacts.path(info.path, field="config.tokenizer"),
        datasets=[*cfg.corpus, context.artifacts.relative(dataset)],
        parameters=parameters,
        parent=parent,
    )
    return register(job, context, metrics, model)


class Batches:
    """Rows of the packed data set: a shuffled endless stream for training, a held-out tail for evaluation."""

    def __init__(self, dataset: Path, eval_fraction: float, seed: int) -> None:
        _, shards = load_packed(dataset)
        rows = np.concatenate([np.asarray(s) for s in shards]).astype(np.int64)  # (sequences, seq_len)
        held = max(1, round(len(rows) * eval_fraction))
        self.train, self.heldout = rows[:-held], rows[-held:]
        self.seed = seed
        self._order: tuple[int, np.ndarray] | None = None

    def _row(self, k: int) -> int:
        """The k-th row of the stream: epoch e is a permutation seeded with seed + e."""
        epoch, i = divmod(k, len(self.train))
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng(self.seed + epoch).permutation(len(self.train)))
        return int(self._order[1][i])

    def batch(self, first: int, size: int) -> torch.Tensor:
        """Rows first .. first+size-1 of the stream, as a (size, seq_len) tensor."""
        return torch.from_numpy(self.train[[self._row(first + i) for i in range(size)]])


def mixed_precision(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on a GPU that has bf16 (weights and optimiser stay fp32); nothing on a CPU."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether the model's parameters are FSDP shards (its forwards are then collective)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def build_optimizer(model: torch.nn.Module, cfg: LoopSettings) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on norms' gains)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.95))


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    objective: Objective,
    data: Batches,
    cfg: LoopConfig,
    step: int,
) -> float:
    """One optimiser step over grad_accum_steps micro-batches; returns this worker's mean loss."""
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    device = ray.train.torch.get_device()
    total = 0.0
    for micro in range(cfg.grad_accum_steps):
        first = ((step * cfg.grad_accum_steps + micro) * world + rank) * cfg.micro_batch_size
        batch = data.batch(first, cfg.micro_batch_size).to(device)
        last = micro == cfg.grad_accum_steps - 1
        sync = contextlib.nullcontext() if last or not isinstance(model, DistributedDataParallel) else model.no_sync()
        with sync:
            with mixed_precision(device):
                loss = objective.loss(model, batch, first) / cfg.grad_accum_steps
            loss.backward()
        total += loss.item()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


@torch.no_grad()
def evaluate(model: torch.nn.Module, objective: Objective, data: Batches, batch_size: int) -> dict[str, float]:
    """Held-out means over all workers (each takes every world-th row)."""
    context = ray.train.get_context()
    world = context.get_world_size()
    rows = data.heldout[context.get_world_rank() :: world]
    if is_sharded(model):  # every worker must run as many forwards as the others
        rows = rows[: len(data.heldout) // world]
    inner = unwrap(model)
    inner.eval()
    device = ray.train.torch.get_device()
    totals: dict[str, list[float]] = {}
    for start in range(0, len(rows), batch_size):
        with mixed_precision(device):
            sums = objective.heldout(inner, torch.from_numpy(rows[start : start + batch_size]).to(device))
        for name, (value, count) in sums.items():
            running = totals.setdefault(name, [0.0, 0.0])
            running[0] += value
            running[1] += count
    inner.train()
    names = sorted(totals) or ["loss"]
    both = torch.tensor([totals.get(n, [0.0, 0.0]) for n in names], dtype=torch.float64, device=device)  # (names, 2)
    dist.all_reduce(both)
    return {name: float(both[i, 0] / max(float(both[i, 1]), 1.0)) for i, name in enumerate(names)}


def agree(loss: float, stop: bool) -> tuple[float, bool]:
    """All workers' mean loss, and whether any was told to stop (only rank 0 reads the request)."""
    values = torch.tensor([loss, float(stop)], dtype=torch.float64, device=ray.train.torch.get_device())
    dist.all_reduce(values)
    return float(values[0]) / dist.get_world_size(), bool(values[1] > 0)


class Reporter:
    """Rank 0's progress reports: mean loss and throughput over each window of log_every steps."""

    def __init__(self, store: JobStore, job_id: str, cfg: LoopConfig, tokens_per_step: int, span: Span) -> None:
        self.store, self.job_id, self.cfg, self.tokens_per_step, self.span = store, job_id, cfg, tokens_per_step, span
        self.losses: list[float] = []
        self.started = time.perf_counter()

    def step(self, state: TrainState, loss: float, learning_rate: float) -> None:
        self.losses.append(loss)
        if state.step % self.cfg.log_every and state.step != self.cfg.max_steps:
            return
        seconds = time.perf_counter() - self.started
        per_step = seconds / len(self.losses)
        self.store.report_progress(
            self.job_id,
            {
                "step": self.span.first_step + state.step,
                "total_steps": self.span.total_steps or self.cfg.max_steps,
                "loss": sum(self.losses) / len(self.losses),
                "learning_rate": learning_rate,
                "tokens_per_second": self.tokens_per_step / per_step,
                "eta_seconds": per_step * (self.cfg.max_steps - state.step + self.span.later_steps),
                "tokens_seen": state.tokens_seen,
            },
        )
        self.losses.clear()
        self.started = time.perf_counter()


def place(model: torch.nn.Module, cfg: LoopConfig) -> torch.nn.Module:
    """The model on this worker's device: sharded (FSDP) or replicated (DDP, when there are several workers)."""
    if cfg.fsdp:
        return sharding.shard(model, ray.train.torch.get_device())
    return ray.train.torch.prepare_model(model)


def whole(model: torch.nn.Module, objective: Objective, cfg: LoopConfig) -> Any:
    """The trained model in one piece, to save (on rank 0; under FSDP every rank takes part in gathering it)."""
    if not cfg.fsdp:
        return unwrap(model)
    state = sharding.full_model_state(model)
    if dist.get_rank() != 0:
        return None
    fresh = objective.build()
    fresh.load_state_dict(state)
    return fresh


def train_loop(loop_config: dict[str, Any]) -> None:
    """The body every Ray Train worker runs (see the module docstring)."""
    cfg = LoopConfig(**loop_config["loop"])
    objective: Objective = loop_config["objective"]
    worker = WorkerRun(loop_config)
    job_id, run_id, store, artifacts, rank = worker.job_id, worker.run_id, worker.store, worker.artifacts, worker.rank
    data = Batches(worker.dataset, cfg.eval_fraction, cfg.seed)

    torch.manual_seed(cfg.seed)
    model = place(objective.build(), cfg)
    optimizer = build_optimizer(model, cfg)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, cfg.warmup_steps, cfg.max_steps, min_lr_rate=cfg.min_lr_ratio
    )
    state = TrainState()
    latest = checkpoints.latest(artifacts, run_id)
    if latest is not None:
        restore = sharding.restore if cfg.fsdp else checkpoints.restore
        state = restore(latest, unwrap(model), optimizer, scheduler)
        worker.resumed(latest, state.step)
    tokens_per_step = cfg.grad_accum_steps * cfg.micro_batch_size * dist.get_world_size() * cfg.seq_len
    reporter = Reporter(store, job_id, cfg, tokens_per_step, Span(**loop_config["span"]))

    loss = float("nan")
    while state.step < cfg.max_steps:
        loss = train_step(model, optimizer, objective, data, cfg, state.step)
        scheduler.step()
        state = TrainState(state.step + 1, state.tokens_seen + tokens_per_step)
        loss, stop = agree(loss, rank == 0 and bool(store.stop_requested(job_id)))
        if rank == 0:
            reporter.step(state, loss, scheduler.get_last_lr()[0])
        if stop or state.step % cfg.checkpoint_every == 0:
            heldout = evaluate(model, objective, data, cfg.micro_batch_size)
            save = sharding.save if cfg.fsdp else checkpoints.save
            if rank == 0 or cfg.fsdp:  # FSDP gathers the state on every worker
                saved = save(artifacts, run_id, state, unwrap(model), optimizer, scheduler, cfg.keep_checkpoints)
            if rank == 0:
                store.update(job_id, checkpoint=saved)
                store.log(job_id, f"step {state.step}: held-out loss {heldout['loss']:.4f}; checkpoint {saved}")
        if stop:
            return
    heldout = evaluate(model, objective, data, cfg.micro_batch_size)
    finished_model = whole(model, objective, cfg)
    if rank == 0:
        metrics = {**objective.metrics(heldout), "train_loss": loss, "tokens_seen": state.tokens_seen}
        metrics["steps"] = state.step
        worker.finish(metrics, finished_model.save_pretrained)
