"""Job types and what a job gets to run with.

Each job type is a class with two methods: `check(config, context)` refuses bad input at
submission (raising InvalidArgument / NotFound naming the field) and returns the config to store,
with references pinned (e.g. "tokenizer" -> "tokenizer:3"); `run(job, context)` runs the job to
its end and returns DONE, or CANCEL / PREEMPT when it stopped early because it was asked to.
Types are plugins of the `objectives` kind (entry-point group `llmp.objectives`): the built-ins in
an explicit name -> "module:Class" table, a third party's from its installed package.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from libs.common.artifacts import ArtifactStore
from libs.common.clients.tokenizer import TokenizerClient
from libs.common.errors import InvalidArgument
from libs.common.plugins import Registry
from services.training.dataprep.stage import field_prefix, require
from services.training.jobstore import JobRecord, JobStore
from services.training.registry import ModelRegistry

DONE = "done"
C = TypeVar("C")

BUILTIN_JOB_TYPES: dict[str, str] = {
    "prepare": "services.training.jobs.prepare:PrepareJob",
    "pretrain": "services.training.jobs.pretrain:PretrainJob",
    "mlm": "services.training.jobs.mlm:MaskedLMJob",
    "sweep": "services.training.jobs.sweep:ScalingSweepJob",
    "distill": "services.training.jobs.distill:DistillJob",
    "sft": "services.training.jobs.align:SFTJob",
    "reward": "services.training.jobs.align:RewardJob",
    "dpo": "services.training.jobs.align:DPOJob",
    "grpo": "services.training.jobs.align:GRPOJob",
    "rloo": "services.training.jobs.align:RLOOJob",
    "ppo": "services.training.jobs.ppo:PPOJob",
}


@dataclass
class JobContext:
    """The services and settings every job runs with."""

    store: JobStore
    registry: ModelRegistry
    artifacts: ArtifactStore
    tokenizer: TokenizerClient
    redis_url: str
    worker_memory_bytes: int
    ray_storage: str
    worker_gpus: int = 0


@dataclass(kw_only=True)
class LoopSettings:
    """The optimisation loop's settings every training job shares.

    Both loops extend it: pretraining's own (`lm_loop.LoopConfig`, these defaults) and the `trl`
    trainer's for alignment (`hf_loop.HFLoop`, which sets its own defaults).
    """

    max_steps: int = 1000
    """Optimiser steps."""
    micro_batch_size: int = 8
    """Sequences (examples) per worker per forward pass."""
    grad_accum_steps: int = 1
    """Forward passes summed into one optimiser step."""
    learning_rate: float = 3e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at learning_rate * min_lr_ratio."""
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    num_workers: int = 2
    """Ray Train workers (data-parallel replicas)."""
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_fraction: float = 0.05
    """Share of the data held out for the validation loss."""
    use_gpu: bool = False
    """One GPU per worker (the service's `worker_gpus` must be >= 1); bf16 mixed precision where the GPU has it.
    num_workers is then the number of GPUs."""

    def check_loop(self) -> None:
        """Refuse settings no loop can run with (InvalidArgument naming the field)."""
        for name in (
            "max_steps",
            "micro_batch_size",
            "grad_accum_steps",
            "num_workers",
            "checkpoint_every",
            "keep_checkpoints",
            "log_every",
        ):
            require(getattr(self, name) >= 1, "must be >= 1", name)
        require(0 <= self.warmup_steps < self.max_steps, "must be in [0, max_steps)", "warmup_steps")
        require(0 < self.learning_rate <= 1, "must be in (0, 1]", "learning_rate")
        require(0 <= self.min_lr_ratio <= 1, "must be in [0, 1]", "min_lr_ratio")
        require(self.weight_decay >= 0, "must be >= 0", "weight_decay")
        require(self.grad_clip >= 0, "must be >= 0 (0: no clipping)", "grad_clip")
        require(0 < self.eval_fraction < 0.5, "must be in (0, 0.5)", "eval_fraction")


class JobType(Protocol):
    def check(self, config: dict[str, Any], context: JobContext) -> dict[str, Any]: ...

    def run(self, job: JobRecord, context: JobContext) -> str: ...


OBJECTIVES: Registry[JobType] = Registry("objectives", BUILTIN_JOB_TYPES)


def job_type(name: str) -> JobType:
    """The job type called `name`, built-in or installed; unknown names are refused naming the field `type`."""
    known = OBJECTIVES.names()
    if name not in known:
        raise InvalidArgument(f"unknown job type {name!r}; expected one of {known}", field="type")
    return OBJECTIVES.get(name)()


def _is_a(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_is_a(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def parse_config(cls: type[C], data: dict[str, Any]) -> C:
    """A job's config dataclass from submitted data; every error names its field as `config.<name>`."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if key not in fields:
            raise InvalidArgument(f"unknown setting; expected one of {sorted(fields)}", field=f"config.{key}")
        if not _is_a(value, hints[key]):
            expected = getattr(hints[key], "__name__", hints[key])
            raise InvalidArgument(f"{value!r} is not a valid {expected}", field=f"config.{key}")
    for name, f in fields.items():
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise InvalidArgument("is required", field=f"config.{name}")
    with field_prefix("config"):
        return cls(**data)
