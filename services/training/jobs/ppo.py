"""The `ppo` job: RLHF with PPO, the policy started from an SFT model and trained against a reward model.

    sft -> reward (on preference pairs) -> ppo (the SFT model's copy against the reward model,
                                                KL-penalised per token to the frozen SFT model)

A job config, as submitted (`base`, `reward_model`, `data` and `model_name` are required):

    {"base": "tiny-sft:latest", "reward_model": "tiny-rm:latest", "data": ["pydoc:instructions"],
     "model_name": "tiny-ppo", "max_steps": 50, "micro_batch_size": 8, "grad_accum_steps": 2,
     "kl_coef": 0.05, "kl_target": 6.0, "ppo_epochs": 4, "max_completion_length": 32}

Each step every worker samples `micro_batch_size * grad_accum_steps` completions and makes
`ppo_epochs * grad_accum_steps` optimiser steps on them (jobs/ppo_loop.py has the loop,
jobs/ppo_loss.py the arithmetic). The data are prompts (records with a "prompt"; the others'
fields are ignored), and their held-out split gives the metrics: `eval_reward` and `eval_kl` (nats
per token; `eval_kl_per_completion`) after training, `eval_reward_before` and `eval_kl_before` (0)
of the SFT model.
The registered model is the policy alone (the value head is only for training), with the SFT
model as its parent and the reward model in its lineage. PPO trains every weight: `lora_rank` is
refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from libs.common.errors import InvalidArgument
from services.training.dataprep.stage import require
from services.training.jobs import JobContext
from services.training.jobs.align import BYTES_FP32, AlignConfig, AlignJob, same_tokenizer
from services.training.jobs.ppo_loop import Models, PPOParams
from services.training.jobstore import JobRecord
from services.training.registry import Registered, registered


@dataclass(kw_only=True)
class PPOJobConfig(AlignConfig, PPOParams):
    """The alignment settings (AlignConfig), PPO's (PPOParams) and the reward model."""

    reward_model: str
    """A registered reward model (from a `reward` job) that scores prompt + completion."""
    learning_rate: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("kl_coef", "kl_target", "clip_range", "value_clip_range", "vf_coef"):
            require(getattr(self, name) >= 0, "must be >= 0", name)
        require(0 < self.gamma <= 1, "must be in (0, 1]", "gamma")
        require(0 <= self.lam <= 1, "must be in [0, 1]", "lam")
        for name in ("ppo_epochs", "kl_horizon", "max_completion_length"):
            require(getattr(self, name) >= 1, "must be >= 1", name)
        require(self.temperature > 0, "must be > 0", "temperature")
        require(
            self.max_completion_length < self.max_length, "must be < max_length (room for the prompt)", "max_length"
        )
        require(self.lora_rank == 0, "PPO trains the full policy: leave lora_rank at 0", "lora_rank")


class PPOJob(AlignJob):
    config_class = PPOJobConfig
    data_kind = "prompt"

    def models(self, cfg: PPOJobConfig, context: JobContext) -> tuple[Registered, dict[str, Any], int]:
        """The base, the reward model pinned, and the frozen reference and reward model's bytes per worker."""
        base, pinned, _ = super().models(cfg, context)
        reward = self.reward(cfg, context)
        same_tokenizer(base, reward, "config.reward_model")
        frozen = (reward.shape.param_count() + base.shape.param_count()) * BYTES_FP32
        return base, {**pinned, "reward_model": reward.info.ref}, frozen

    def reward(self, cfg: PPOJobConfig, context: JobContext) -> Registered:
        return registered(context.registry, cfg.reward_model, "config.reward_model", head="ForSequenceClassification")

    def check(self, config: dict[str, Any], context: JobContext) -> dict[str, Any]:
        if config.get("quantize"):
            raise InvalidArgument("PPO trains the full policy; QLoRA is not offered", field="config.quantize")
        return super().check(config, context)

    def fit(
        self, job: JobRecord, context: JobContext, cfg: PPOJobConfig, base: Registered, dataset: Path
    ) -> dict[str, float] | None:
        from services.training.jobs import ppo_loop
        from services.training.jobs.workers import run_on_workers

        models = Models(
            policy=str(base.path),
            reward=str(self.reward(cfg, context).path),
            max_prompt_length=cfg.max_length - cfg.max_completion_length,
        )
        params = PPOParams(**{name: getattr(cfg, name) for name in PPOParams.__dataclass_fields__})
        settings = ppo_loop.settings(cfg.loop(), params, models)
        return run_on_workers(job, context, ppo_loop.train_loop, dataset, settings, cfg.num_workers, cfg.use_gpu)

    def parents(self, cfg: PPOJobConfig) -> tuple[str, ...]:
        return (cfg.reward_model,)
