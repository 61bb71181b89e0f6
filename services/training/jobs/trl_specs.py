"""The `trl` trainers of the alignment jobs, as built on each Ray Train worker (see jobs/align.py, jobs/hf_loop.py).

Each spec loads the base from its folder in the artifact store (safetensors + config, never remote
code), its tokeniser (the pad token falls back to the end-of-sequence one), optionally wraps it in
a LoRA adapter (peft; on an NF4-quantised base for QLoRA) and builds the trl trainer:

    SFTSpec     trl.SFTTrainer      next-token loss on the completion (or the whole chat)
    RewardSpec  trl.RewardTrainer   a scalar head; Bradley-Terry loss -log sigmoid(r_chosen - r_rejected)
    DPOSpec     trl.DPOTrainer      -log sigmoid(beta * (log-ratio chosen - log-ratio rejected)) to a frozen reference
    GRPOSpec    trl.GRPOTrainer     group-relative advantages from a reward model, KL penalty (beta) to the base
    RLOOSpec    trl.RLOOTrainer     leave-one-out baseline within each prompt's group, KL penalty (beta) to the base
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from datasets import Dataset
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
)

from services.training.jobs.hf_loop import TrainerSpec


def load_tokenizer(folder: str) -> PreTrainedTokenizerBase:
    """A model folder's tokeniser; its end-of-sequence token from the model's config if the tokeniser names
    none, and the pad token falling back to it."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    eos_id = AutoConfig.from_pretrained(folder).eos_token_id
    if tokenizer.eos_token is None and isinstance(eos_id, int):
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _eval_every(arguments: dict[str, Any]) -> dict[str, Any]:
    """Held-out metrics at every checkpoint."""
    return {**arguments, "eval_strategy": "steps", "eval_steps": arguments["save_steps"]}


@dataclass
class BaseSpec(TrainerSpec):
    base: str
    """Folder of the base model (and its tokeniser)."""
    lora: dict[str, Any] | None
    merge: bool
    quantize: str
    max_length: int

    model_class: ClassVar[Any] = AutoModelForCausalLM
    task_type: ClassVar[str] = "CAUSAL_LM"
    head: ClassVar[dict[str, Any]] = {}
    """Extra settings of model_class.from_pretrained (a reward model's single score)."""
    metrics: ClassVar[dict[str, str]] = {}
    """Our metric name -> the trainer's evaluate() key."""

    def trainer(
        self, cls: Any, args: Any, train: list[dict[str, Any]], heldout: list[dict[str, Any]], **extra: Any
    ) -> Trainer:
        """A trl trainer of the base (under a LoRA adapter if asked) on the records."""
        tokenizer = self.tokenizer()
        trainer: Trainer = cls(
            model=self.load(tokenizer),
            args=args,
            train_dataset=Dataset.from_list(train),
            eval_dataset=Dataset.from_list(heldout),
            processing_class=tokenizer,
            peft_config=self.peft_config(),
            **extra,
        )
        return trainer

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        found = trainer.evaluate()
        return {ours: float(found[theirs]) for ours, theirs in self.metrics.items() if theirs in found}

    def tokenizer(self, folder: str = "") -> PreTrainedTokenizerBase:
        return load_tokenizer(folder or self.base)

    def load(self, tokenizer: PreTrainedTokenizerBase, folder: str = "") -> PreTrainedModel:
        options: dict[str, Any] = {"dtype": torch.float32, **self.head}
        if self.quantize == "nf4":
            from transformers import BitsAndBytesConfig

            options["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
            options["dtype"] = torch.bfloat16
        model = self.model_class.from_pretrained(folder or self.base, **options)
        model.config.pad_token_id = tokenizer.pad_token_id
        if self.quantize:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model)
        return model

    def peft_config(self) -> Any:
        if not self.lora:
            return None
        from peft import LoraConfig

        return LoraConfig(**self.lora, task_type=self.task_type)

    def save(self, trainer: Trainer, folder: Path) -> None:
        """The full model; with LoRA, the adapter merged into a full-precision base, or the adapter alone."""
        model = trainer.accelerator.unwrap_model(trainer.model)
        if not (self.lora and self.merge):
            model.save_pretrained(folder)
            return
        from peft import PeftModel

        with tempfile.TemporaryDirectory() as adapter:
            model.save_pretrained(adapter)
            tokenizer = self.tokenizer()
            base = self.model_class.from_pretrained(self.base, dtype=torch.float32, **self.head)
            base.config.pad_token_id = tokenizer.pad_token_id
            merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
            merged.save_pretrained(folder)


@dataclass
class SFTSpec(BaseSpec):
    completion_only: bool = True
    packing: bool = False
    """Pack examples into rows of max_length (best-fit decreasing), each attending only to itself."""

    metrics: ClassVar[dict[str, str]] = {"eval_loss": "eval_loss", "eval_token_accuracy": "eval_mean_token_accuracy"}

    def build(self, arguments: dict[str, Any], train: list[dict[str, Any]], heldout: list[dict[str, Any]]) -> Trainer:
        from trl import SFTConfig, SFTTrainer

        chat = "messages" in train[0]
        args = SFTConfig(
            **_eval_every(arguments),
            max_length=self.max_length,
            completion_only_loss=None if chat else self.completion_only,
            packing=self.packing,
        )
        return self.trainer(SFTTrainer, args, train, heldout)

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        metrics = super().evaluate(trainer)
        return {**metrics, "perplexity": math.exp(min(metrics["eval_loss"], 50.0))}


@dataclass
class RewardSpec(BaseSpec):
    center_rewards: float = 0.01

    model_class: ClassVar[Any] = AutoModelForSequenceClassification
    task_type: ClassVar[str] = "SEQ_CLS"
    head: ClassVar[dict[str, Any]] = {"num_labels": 1}
    metrics: ClassVar[dict[str, str]] = {
        "eval_loss": "eval_loss",
        "eval_accuracy": "eval_accuracy",
        "eval_margin": "eval_margin",
    }

    def build(self, arguments: dict[str, Any], train: list[dict[str, Any]], heldout: list[dict[str, Any]]) -> Trainer:
        from trl import RewardConfig, RewardTrainer

        args = RewardConfig(
            **_eval_every(arguments),
            max_length=self.max_length,
            center_rewards_coefficient=self.center_rewards or None,
        )
        return self.trainer(RewardTrainer, args, train, heldout)


@dataclass
class DPOSpec(BaseSpec):
    beta: float = 0.1
    reference: str = ""
    """Folder of another reference model; "": the base (with LoRA: the base under the disabled adapter)."""

    metrics: ClassVar[dict[str, str]] = {
        "eval_loss": "eval_loss",
        "eval_reward_accuracy": "eval_rewards/accuracies",
        "eval_reward_margin": "eval_rewards/margins",
        "eval_logp_chosen": "eval_logps/chosen",
        "eval_logp_rejected": "eval_logps/rejected",
    }

    def build(self, arguments: dict[str, Any], train: list[dict[str, Any]], heldout: list[dict[str, Any]]) -> Trainer:
        from trl import DPOConfig, DPOTrainer

        reference = None
        if self.reference or not self.lora:
            reference = self.load(self.tokenizer(), self.reference)
            reference.requires_grad_(False)
        args = DPOConfig(**_eval_every(arguments), max_length=self.max_length, beta=self.beta)
        return self.trainer(DPOTrainer, args, train, heldout, ref_model=reference)


@dataclass
class GRPOSpec(BaseSpec):
    reward_model: str = ""
    """Folder of the reward model."""
    beta: float = 0.04
    num_generations: int = 4
    max_completion_length: int = 64
    temperature: float = 1.0

    metrics: ClassVar[dict[str, str]] = {"eval_reward": "eval_reward", "eval_kl": "eval_kl"}
    trainer_class: ClassVar[str] = "GRPO"
    """trl's <name>Config and <name>Trainer."""

    def build(self, arguments: dict[str, Any], train: list[dict[str, Any]], heldout: list[dict[str, Any]]) -> Trainer:
        import trl

        config_class, trainer_class = (getattr(trl, f"{self.trainer_class}{kind}") for kind in ("Config", "Trainer"))
        reward_tokenizer = self.tokenizer(self.reward_model)
        reward = AutoModelForSequenceClassification.from_pretrained(self.reward_model, num_labels=1)
        reward.config.pad_token_id = reward_tokenizer.pad_token_id
        args = config_class(
            **arguments,
            beta=self.beta,
            num_generations=self.num_generations,
            max_completion_length=self.max_completion_length,
            temperature=self.temperature,
        )
        prompts = [[{"prompt": r["prompt"]} for r in rows] for rows in (train, heldout)]
        return self.trainer(
            trainer_class, args, *prompts, reward_funcs=reward, reward_processing_classes=reward_tokenizer
        )


@dataclass
class RLOOSpec(GRPOSpec):
    """REINFORCE with a leave-one-out baseline: each completion's advantage is its reward less the mean of the
    other completions of its prompt (trl.RLOOTrainer); the KL penalty (beta) to the base as GRPO's."""

    trainer_class: ClassVar[str] = "RLOO"
