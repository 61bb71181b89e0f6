"""Alignment jobs (SFT, reward model, DPO, GRPO) run a `trl` trainer on Ray Train workers.

`fit` starts a TorchTrainer whose workers each build the job's `trl` trainer (a transformers
Trainer: DDP over the process group Ray sets up, gradient accumulation, warm-up + cosine
schedule) from a `TrainerSpec`, and joins it to the job:

- progress: rank 0 turns each of the trainer's log records into a progress report (step, loss,
  learning rate, tokens/s, ETA, and the job type's own figures such as the mean reward);
- stop: rank 0 reads the job's stop request after every step and shares it with the other ranks
  (all-reduce), so all stop at the same step, after the trainer saved a checkpoint;
- checkpoints: the trainer's own (`checkpoint-<step>/`: weights, optimiser, schedule, RNG and the
  data position) every `checkpoint_every` steps under `checkpoints/<run_id>/hf/`; a restarted worker
  group (`FailureConfig`) or a resumed job goes on from the newest complete one;
- the end: held-out metrics from the spec (also measured before the first step, as
  `<name>_before`), then `final/` (a Hugging Face folder: the full model, or the LoRA adapter
  alone when the job keeps it) and `final.json`, as every loop writes them (`workers.WorkerRun.finish`).

The data are JSON-lines files the driver wrote (`train.jsonl`, `eval.jsonl`); each worker reads them.
"""

from __future__ import annotations

import json
import os
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainerControl, TrainerState, set_seed
from transformers import TrainingArguments as HFArguments

from libs.common.artifacts import ArtifactStore
from services.training import checkpoints
from services.training.jobs import JobContext, LoopSettings
from services.training.jobs.workers import WorkerRun, run_on_workers
from services.training.jobstore import JobRecord, JobStore

HF_CHECKPOINTS = "hf"
CHECKPOINT_PREFIX = "checkpoint-"
COMPLETE_MARKER = "trainer_state.json"
"""The trainer writes this last into a checkpoint folder: a folder without it was cut short."""
PROGRESS_KEYS = ("loss", "learning_rate", "grad_norm", "epoch")
"""Log keys that are not the job type's own figures."""
EVAL_SEED_OFFSET = 1_000_003
"""The held-out metrics are measured with seed + this, before and after training alike (GRPO and RLOO sample)."""


@dataclass(kw_only=True)
class HFLoop(LoopSettings):
    """The trainer's settings every alignment job shares (its config extends this), with fine-tuning's defaults."""

    max_steps: int = 100
    learning_rate: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    num_workers: int = 1
    checkpoint_every: int = 50
    eval_fraction: float = 0.1


class TrainerSpec(ABC):
    """One alignment job's trainer. Built on the driver (small, picklable), used on every worker."""

    @abstractmethod
    def build(self, arguments: dict[str, Any], train: list[dict[str, Any]], heldout: list[dict[str, Any]]) -> Trainer:
        """The trl trainer, from the transformers.TrainingArguments settings every job shares and the data."""

    @abstractmethod
    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        """Held-out metrics of the trained model; runs on every rank (the trainer's evaluate is collective)."""

    def save(self, trainer: Trainer, folder: Path) -> None:
        """The finished model as a Hugging Face folder (its tokeniser included)."""
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        unwrapped.save_pretrained(folder)
        tokenizer = trainer.processing_class
        if isinstance(tokenizer, PreTrainedTokenizerBase):
            tokenizer.save_pretrained(folder)


def fit(
    job: JobRecord,
    context: JobContext,
    dataset: Path,
    spec: TrainerSpec,
    loop: HFLoop,
    run_id: str = "",
) -> dict[str, float] | None:
    """Run the spec's trainer on the job's Ray Train workers; the final metrics, or None if it stopped early."""
    settings = {"loop": asdict(loop), "spec": spec}
    return run_on_workers(job, context, train_loop, dataset, settings, loop.num_workers, loop.use_gpu, run_id)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint the trainer finished writing."""
    if not folder.is_dir():
        return None
    complete = [p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if (p / COMPLETE_MARKER).is_file()]
    return max(complete, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)), default=None)


def arguments(loop: HFLoop, output_dir: Path) -> dict[str, Any]:
    """transformers.TrainingArguments settings from the job's loop settings."""
    return {
        "output_dir": str(output_dir),
        "max_steps": loop.max_steps,
        "per_device_train_batch_size": loop.micro_batch_size,
        "per_device_eval_batch_size": loop.micro_batch_size,
        "gradient_accumulation_steps": loop.grad_accum_steps,
        "learning_rate": loop.learning_rate,
        "lr_scheduler_type": "cosine_with_min_lr",
        "lr_scheduler_kwargs": {"min_lr_rate": loop.min_lr_ratio},
        "warmup_steps": loop.warmup_steps,
        "weight_decay": loop.weight_decay,
        "max_grad_norm": loop.grad_clip or 1e9,
        "seed": loop.seed,
        "data_seed": loop.seed,
        "logging_steps": loop.log_every,
        "save_strategy": "steps",
        "save_steps": loop.checkpoint_every,
        "save_total_limit": loop.keep_checkpoints,
        "report_to": [],
        "use_cpu": not loop.use_gpu,
        "bf16": loop.use_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "include_num_input_tokens_seen": True,
        "ddp_find_unused_parameters": False,
    }


class JobCallback(TrainerCallback):
    """Joins a trainer to its job: progress reports, the stop request, checkpoint records."""

    def __init__(self, store: JobStore, job_id: str, artifacts: ArtifactStore) -> None:
        self.store, self.job_id, self.artifacts = store, job_id, artifacts
        self.rank = ray.train.get_context().get_world_rank()
        self.stopped = False
        self.window_started = time.perf_counter()
        self.window_step = 0
        self.window_tokens = 0

    def on_train_begin(self, args: HFArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self.window_started, self.window_step, self.window_tokens = (
            time.perf_counter(),
            state.global_step,
            state.num_input_tokens_seen,
        )

    def on_step_end(self, args: HFArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if state.global_step == state.max_steps:
            control.should_log = True  # the last step is always reported, whatever log_every
        asked = self.rank == 0 and bool(self.store.stop_requested(self.job_id))
        flag = torch.tensor([float(asked)], dtype=torch.float64, device=ray.train.torch.get_device())  # NCCL: on GPU
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag)
        if flag.item() > 0:
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True

    def on_log(
        self, args: HFArguments, state: TrainerState, control: TrainerControl, logs: dict[str, Any] | None = None, **kw
    ) -> None:
        if self.rank != 0 or not logs:
            return
        if any(k.startswith("eval_") for k in logs):
            shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(logs.items()) if isinstance(v, int | float))
            self.store.log(self.job_id, f"step {state.global_step}: held-out {shown}")
            return
        if "loss" not in logs:
            return
        now = time.perf_counter()
        steps = max(state.global_step - self.window_step, 1)
        per_step = (now - self.window_started) / steps
        tokens = state.num_input_tokens_seen - self.window_tokens
        values = {
            k.replace("/", "_"): float(v)
            for k, v in logs.items()
            if k not in PROGRESS_KEYS and isinstance(v, int | float) and not isinstance(v, bool)
        }
        progress: dict[str, Any] = {
            "step": state.global_step,
            "total_steps": state.max_steps,
            "loss": float(logs["loss"]),
            "learning_rate": float(logs.get("learning_rate", 0.0)),
            "tokens_per_second": tokens / max(now - self.window_started, 1e-9),
            "eta_seconds": per_step * (state.max_steps - state.global_step),
            "tokens_seen": int(state.num_input_tokens_seen),
            "values": values,
        }
        self.store.report_progress(self.job_id, progress)
        self.window_started, self.window_step, self.window_tokens = now, state.global_step, state.num_input_tokens_seen

    def on_save(self, args: HFArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if self.rank != 0:
            return
        saved = self.artifacts.relative(Path(str(args.output_dir)) / f"{CHECKPOINT_PREFIX}{state.global_step}")
        self.store.update(self.job_id, checkpoint=saved)
        self.store.log(self.job_id, f"step {state.global_step}: checkpoint {saved}")


def train_loop(loop_config: dict[str, Any]) -> None:
    """The body every Ray Train worker runs (see the module docstring)."""
    loop = HFLoop(**loop_config["loop"])
    spec: TrainerSpec = loop_config["spec"]
    worker = WorkerRun(loop_config)
    train, heldout = read_jsonl(worker.dataset / "train.jsonl"), read_jsonl(worker.dataset / "eval.jsonl")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    output = worker.artifacts.path(f"{checkpoints.job_dir(worker.run_id)}/{HF_CHECKPOINTS}")
    set_seed(loop.seed)  # new weights (a reward model's head, a LoRA adapter) start the same on every run
    trainer = spec.build(arguments(loop, output), train, heldout)
    callback = JobCallback(worker.store, worker.job_id, worker.artifacts)
    trainer.add_callback(callback)
    resume = latest_checkpoint(output)

    def evaluate() -> dict[str, float]:
        set_seed(loop.seed + EVAL_SEED_OFFSET)  # sampled held-out completions drawn alike before and after training
        return spec.evaluate(trainer)

    if resume is not None:
        worker.resumed(resume)
    else:
        worker.measure_before(evaluate)
    trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    if callback.stopped:
        return
    metrics = evaluate()
    if worker.rank == 0:
        metrics = {
            **worker.with_before(metrics),
            "steps": trainer.state.global_step,
            "tokens_seen": trainer.state.num_input_tokens_seen,
        }
        worker.finish(metrics, lambda folder: spec.save(trainer, folder))
