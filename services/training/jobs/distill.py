"""Distillation of a small draft model from a registered target, for speculative decoding.

A job config, as submitted (only `target` and `model_name` are required; the student's shape and
the loop's settings are those of pretraining):

    {"target": "tiny-code:latest", "model_name": "tiny-code-draft",
     "hidden_size": 64, "num_layers": 1, "temperature": 2.0, "hard_label_weight": 0.1}

The student is a Llama-style model with the target's vocabulary and context length, trained on
the target's corpus (unless `corpus` names another) with the target's tokeniser: a draft must
speak the target's token ids, so a job naming another tokeniser is refused. Its loss is the KL
divergence from the teacher's next-token distribution to the student's, both softened by
`temperature` (and scaled by its square, so gradients keep their size), optionally mixed with the
usual next-token cross-entropy (`hard_label_weight`). The teacher is loaded, frozen, on every
worker. Held-out metrics: the student's loss, the KL at temperature 1, and how often its most
likely token is the teacher's (top-1 agreement: about the acceptance rate of greedy drafting).
The registered model has the target as its lineage parent and loads as the inference engine's
`draft_model` drafter (services/inference/engine/drafters.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from libs.common.artifacts import check_name
from libs.common.errors import InvalidArgument
from libs.common.planning import training_memory
from services.training.dataprep.stage import require
from services.training.jobs import JobContext, parse_config
from services.training.jobs.data import DataConfig, causal_data, check_data
from services.training.jobs.llama import LlamaShape
from services.training.jobs.lm_loop import LoopConfig, Objective, Sums, train_and_register
from services.training.jobs.resources import check_gpu, check_memory
from services.training.jobs.tokenizer import describe_tokenizer, end_of_document_token
from services.training.jobstore import JobRecord
from services.training.registry import Registered, registered

DRAFTABLE = ("llama", "mistral", "gpt2", "gpt_neox")  # what the inference engine loads (model_loader.py)
BYTES_FP32 = 4


@dataclass(kw_only=True)
class DistillConfig(DataConfig, LlamaShape, LoopConfig):
    """A distillation job: the student's shape, the loop's settings, and how it learns from the target."""

    target: str
    """The teacher: a registered causal LM ("name", "name:latest" or "name:<version>")."""
    model_name: str
    """Name under which the draft is registered."""
    tokenizer: str = ""
    """"": the target's tokeniser; any other is refused (a draft must share the target's token ids)."""
    corpus: list[str] = field(default_factory=list)
    """[]: the corpora the target was trained on."""
    eos_token: str = ""
    """Special token that ends each document; "" picks the first usual one the tokeniser has."""
    temperature: float = 2.0
    """Both distributions are softened by it before the KL divergence."""
    hard_label_weight: float = 0.0
    """Share of the loss that is the plain next-token cross-entropy; the rest is the KL divergence."""
    hidden_size: int = 128
    num_layers: int = 2

    def __post_init__(self) -> None:
        check_name(self.model_name, "model_name")
        require(bool(self.target), "is required", "target")
        super().__post_init__()
        self.check_shape()
        require(self.temperature > 0, "must be > 0", "temperature")
        require(0 <= self.hard_label_weight <= 1, "must be in [0, 1]", "hard_label_weight")


def find_target(cfg: DistillConfig, context: JobContext) -> Registered:
    """The target from the registry; it must be a causal LM the inference engine can load."""
    target = registered(context.registry, cfg.target, "config.target")
    if target.config.get("model_type") not in DRAFTABLE:
        raise InvalidArgument(
            f"{target.info.ref} is a {target.config.get('model_type')!r} model, not a causal LM of {DRAFTABLE}",
            field="config.target",
        )
    return target


def resolved(cfg: DistillConfig, target: Registered, context: JobContext) -> dict[str, Any]:
    """The tokeniser (the target's; another is refused) and corpus (default: the target's) to use."""
    theirs = target.info.lineage.tokenizer
    if cfg.tokenizer:
        ours = describe_tokenizer(context, cfg.tokenizer).ref
        if ours != theirs:
            raise InvalidArgument(
                f"{target.info.ref} was trained with tokenizer {theirs}, not {ours}: a draft must use its "
                "target's tokenizer (leave tokenizer empty to use it)",
                field="config.tokenizer",
            )
    corpus = cfg.corpus or target.corpora
    if not corpus:
        raise InvalidArgument(f"{target.info.ref} records no corpus; name one", field="config.corpus")
    return {"tokenizer": theirs, "corpus": corpus}


class Distillation(Objective):
    """The lm_loop objective: match the frozen teacher's next-token distributions."""

    def __init__(self, student: LlamaConfig, teacher: Path, temperature: float, hard_label_weight: float) -> None:
        self.student = student.to_dict()
        self.teacher_path = str(teacher)
        self.temperature, self.hard = temperature, hard_label_weight
        self.teacher: torch.nn.Module | None = None

    def build(self) -> torch.nn.Module:
        teacher = AutoModelForCausalLM.from_pretrained(self.teacher_path, local_files_only=True)
        self.teacher = teacher.eval().requires_grad_(False)
        return LlamaForCausalLM(LlamaConfig.from_dict(self.student))

    def _teacher_logits(self, batch: torch.Tensor) -> torch.Tensor:
        assert self.teacher is not None, "build() loads the teacher"
        self.teacher.to(batch.device)  # a no-op once it is there
        with torch.no_grad():
            logits: torch.Tensor = self.teacher(input_ids=batch).logits
        return logits

    def loss(self, model: torch.nn.Module, batch: torch.Tensor, position: int) -> torch.Tensor:
        teacher = self._teacher_logits(batch)
        out = model(input_ids=batch, labels=batch if self.hard else None)
        t = self.temperature
        kl = kl_per_position(out.logits / t, teacher / t).mean() * t * t
        return kl if not self.hard else (1 - self.hard) * kl + self.hard * out.loss

    def heldout(self, model: torch.nn.Module, batch: torch.Tensor) -> Sums:
        teacher = self._teacher_logits(batch)
        student = model(input_ids=batch).logits
        positions = float(batch.numel())
        predicted = float(batch[:, 1:].numel())

        def next_token_loss(logits: torch.Tensor) -> float:
            return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()

        return {
            "loss": (next_token_loss(student), predicted),
            "teacher_loss": (next_token_loss(teacher), predicted),
            "kl": (kl_per_position(student, teacher).sum().item(), positions),
            "agreement": (float((student.argmax(-1) == teacher.argmax(-1)).sum()), positions),
        }

    def metrics(self, heldout: dict[str, float]) -> dict[str, float]:
        return {
            "eval_loss": heldout["loss"],
            "perplexity": math.exp(min(heldout["loss"], 50.0)),
            "teacher_eval_loss": heldout["teacher_loss"],
            "eval_kl": heldout["kl"],
            "top1_agreement": heldout["agreement"],
        }


def kl_per_position(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of each position's next-token distribution, from logits [..., vocab]."""
    return F.kl_div(
        F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), log_target=True, reduction="none"
    ).sum(-1)


class DistillJob:
    def check(self, config: dict[str, Any], context: JobContext) -> dict[str, Any]:
        """Refuse what cannot run; returns the config with the target, tokeniser and corpus pinned."""
        cfg = parse_config(DistillConfig, config)
        target = find_target(cfg, context)
        pinned = resolved(cfg, target, context)
        cfg = parse_config(DistillConfig, {**config, **pinned})
        check_gpu(cfg.use_gpu, context)
        info = describe_tokenizer(context, cfg.tokenizer)
        end_of_document_token(cfg, info)
        positions = int(target.config.get("max_position_embeddings") or cfg.seq_len)
        require(cfg.seq_len <= positions, f"must be <= the target's context ({positions})", "config.seq_len")
        check_data(cfg, context, cfg.seq_len, info)
        vocab = int(target.config["vocab_size"])
        teacher = target.shape.param_count() * BYTES_FP32
        teacher_logits = cfg.micro_batch_size * cfg.seq_len * vocab * BYTES_FP32 * 2
        need = training_memory(cfg.shape(vocab), cfg.micro_batch_size, cfg.seq_len, precision="fp32")
        check_memory(context, need, teacher + teacher_logits, "the student's size")
        return {**config, **pinned, "target": target.info.ref}

    def run(self, job: JobRecord, context: JobContext) -> str:
        cfg = parse_config(DistillConfig, job.config)
        target = find_target(cfg, context)
        vocab = int(target.config["vocab_size"])
        info, eos_id, dataset = causal_data(job, cfg, context, cfg.seq_len, vocab)
        positions = int(target.config.get("max_position_embeddings") or cfg.seq_len)
        student = cfg.model_config(vocab, eos_id, positions)
        objective = Distillation(student, target.path, cfg.temperature, cfg.hard_label_weight)
        parameters = cfg.shape(vocab).param_count()
        return train_and_register(job, context, dataset, objective, cfg, info, parameters, parent=target.info.ref)
