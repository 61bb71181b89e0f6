"""Causal-LM pretraining from scratch: a Llama-style model on a corpus, with Ray Train across workers.

A job config, as submitted (only `tokenizer`, `corpus` and `model_name` are required):

    {"tokenizer": "code", "corpus": ["stdlib"], "model_name": "tiny-code",
     "hidden_size": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "seq_len": 256,
     "micro_batch_size": 8, "grad_accum_steps": 2, "max_steps": 1000, "learning_rate": 3e-4,
     "warmup_steps": 100, "num_workers": 2, "checkpoint_every": 100}

The driver (`PretrainJob.run`, in the service or in a RayJob's driver pod) prepares the data with
`services.training.dataprep` (tokenising through the tokeniser service over gRPC), runs
`lm_loop.train_loop` on `num_workers` Ray Train workers under DDP, and registers the finished model.
The model is `transformers`' LlamaForCausalLM: RoPE, grouped-query attention (`num_kv_heads`),
SwiGLU MLP and RMSNorm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from llmp.tokenizer.v1.tokenizer_pb2 import TokenizerInfo
from transformers import LlamaConfig

from libs.common.artifacts import check_name
from libs.common.errors import InvalidArgument, NotFound, Unavailable
from libs.common.planning import GB, ModelShape, training_memory
from services.training import checkpoints
from services.training.dataprep import DataPrepConfig, prepare_dataset
from services.training.dataprep.stage import field_prefix, require
from services.training.jobs import DONE, JobContext, parse_config
from services.training.jobstore import JobRecord
from services.training.registry import Lineage

DATASETS = "datasets"
EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "[SEP]")
POSITIVE = (
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "seq_len",
    "micro_batch_size",
    "grad_accum_steps",
    "max_steps",
    "num_workers",
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
)


@dataclass
class PretrainConfig:
    """Everything a pretraining job needs; defaults give a small model."""

    tokenizer: str
    """Tokeniser reference in the tokeniser service ("name" or "name:version")."""
    corpus: list[str]
    """Corpus names (from UploadCorpus) or folders/files relative to the artifact store."""
    model_name: str
    """Name under which the finished model is registered."""
    eos_token: str = ""
    """Special token that ends each document; "" picks the first of EOS_TOKENS the tokeniser has."""
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention); must divide num_heads."""
    intermediate_size: int = 0
    """SwiGLU width; 0: 8/3 of hidden_size rounded up to a multiple of 64."""
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    seq_len: int = 256
    """Tokens per training sequence."""
    micro_batch_size: int = 8
    """Sequences per worker per forward pass."""
    grad_accum_steps: int = 1
    """Forward passes summed into one optimiser step."""
    max_steps: int = 1000
    """Optimiser steps."""
    learning_rate: float = 3e-4
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at learning_rate * min_lr_ratio."""
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    eval_fraction: float = 0.05
    """Share of the packed sequences held out for the validation loss."""
    stages: list[dict[str, Any]] = field(default_factory=lambda: [{"type": "normalize"}, {"type": "exact_dedup"}])
    """Data-preparation stages before tokenising (see services.training.dataprep)."""
    num_workers: int = 2
    """Ray Train workers (data-parallel replicas)."""
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10

    def __post_init__(self) -> None:
        check_name(self.model_name, "model_name")
        require(bool(self.tokenizer), "is required", "tokenizer")
        require(bool(self.corpus), "give at least one corpus", "corpus")
        for name in POSITIVE:
            require(getattr(self, name) >= 1, "must be >= 1", name)
        require(self.hidden_size % self.num_heads == 0, "must be a multiple of num_heads", "hidden_size")
        require((self.hidden_size // self.num_heads) % 2 == 0, "must give an even head size (RoPE)", "hidden_size")
        require(self.num_heads % self.num_kv_heads == 0, "must divide num_heads", "num_kv_heads")
        require(self.intermediate_size >= 0, "must be >= 0", "intermediate_size")
        require(0 <= self.warmup_steps < self.max_steps, "must be in [0, max_steps)", "warmup_steps")
        require(0 < self.learning_rate <= 1, "must be in (0, 1]", "learning_rate")
        require(0 <= self.min_lr_ratio <= 1, "must be in [0, 1]", "min_lr_ratio")
        require(self.weight_decay >= 0, "must be >= 0", "weight_decay")
        require(self.grad_clip >= 0, "must be >= 0 (0: no clipping)", "grad_clip")
        require(0 < self.eval_fraction < 0.5, "must be in (0, 0.5)", "eval_fraction")
        require(self.rope_theta > 0, "must be > 0", "rope_theta")

    @property
    def mlp_size(self) -> int:
        return self.intermediate_size or -(-8 * self.hidden_size // 3 // 64) * 64

    def shape(self, vocab_size: int) -> ModelShape:
        return ModelShape(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            vocab_size=vocab_size,
            num_kv_heads=self.num_kv_heads,
            intermediate_size=self.mlp_size,
            tie_embeddings=self.tie_embeddings,
        )

    def model_config(self, vocab_size: int, eos_id: int) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.mlp_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=self.seq_len,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            tie_word_embeddings=self.tie_embeddings,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
        )


def corpus_path(context: JobContext, ref: str, index: int) -> Path:
    """A corpus name (corpora/<name>) or a path relative to the store, which must exist."""
    field_name = f"config.corpus[{index}]"
    named = context.artifacts.path(f"corpora/{ref}", field=field_name)
    path = named if named.is_dir() else context.artifacts.path(ref, field=field_name)
    if not path.exists():
        raise NotFound(f"no corpus {ref!r} in the artifact store", field=field_name)
    return path


def describe_tokenizer(context: JobContext, ref: str) -> TokenizerInfo:
    """The tokeniser's description from the tokeniser service; it must have an end-of-document token."""
    try:
        info = context.tokenizer.describe(ref)
    except grpc.RpcError as e:
        if e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
            raise NotFound(f"the tokeniser service has no tokenizer {ref!r}", field="config.tokenizer") from None
        raise Unavailable(f"the tokeniser service cannot be reached: {e.code().name}") from None
    return info


def end_of_document_token(cfg: PretrainConfig, info: TokenizerInfo) -> str:
    """The special token appended after every document: `eos_token`, else the first usual one present."""
    if cfg.eos_token:
        if cfg.eos_token not in info.special_tokens:
            raise InvalidArgument(f"{cfg.eos_token!r} is not a special token of {info.ref}", field="config.eos_token")
        return cfg.eos_token
    found = next((t for t in EOS_TOKENS if t in info.special_tokens), None)
    if found is None:
        raise InvalidArgument(
            f"{info.ref} has none of {EOS_TOKENS}; name its end-of-document token", field="config.eos_token"
        )
    return found


class PretrainJob:
    def check(self, config: dict[str, Any], context: JobContext) -> dict[str, Any]:
        """Refuse what cannot run; returns the config with the tokeniser pinned to its version."""
        cfg = parse_config(PretrainConfig, config)
        info = describe_tokenizer(context, cfg.tokenizer)
        end_of_document_token(cfg, info)
        paths = [corpus_path(context, ref, i) for i, ref in enumerate(cfg.corpus)]
        with field_prefix("config"):
            DataPrepConfig.from_dict(self._dataprep(cfg, paths, 0, info.vocab_size))
        need = training_memory(cfg.shape(info.vocab_size), cfg.micro_batch_size, cfg.seq_len, precision="fp32")
        if need.total > context.worker_memory_bytes:
            raise InvalidArgument(
                f"training needs {need.total / GB:.2f} GB per worker (weights {need.weights / GB:.2f}, optimiser "
                f"{need.optimizer / GB:.2f}, activations {need.activations / GB:.2f}) but a worker has "
                f"{context.worker_memory_bytes / GB:.2f} GB; lower micro_batch_size, seq_len or the model size",
                field="config.micro_batch_size",
            )
        return {**config, "tokenizer": info.ref}

    @staticmethod
    def _dataprep(cfg: PretrainConfig, paths: list[Path], eos_id: int, vocab_size: int) -> dict[str, Any]:
        return {
            "source": {"type": "text_files", "paths": [str(p) for p in paths]},
            "stages": [*cfg.stages, {"type": "tokenize", "batch_size": 16}],
            "pack": {"seq_len": cfg.seq_len, "eos_id": eos_id, "vocab_size": vocab_size},
        }

    def run(self, job: JobRecord, context: JobContext) -> str:
        from services.training.jobs import lm_loop  # Ray Train and torch: needed to run, not to check

        cfg = parse_config(PretrainConfig, job.config)
        info = describe_tokenizer(context, cfg.tokenizer)
        eos = end_of_document_token(cfg, info)
        eos_id = int(context.tokenizer.encode(cfg.tokenizer, eos, add_special_tokens=False).ids[0])
        dataset = self._prepare(job, cfg, context, eos_id, info.vocab_size)
        stop = context.store.stop_requested(job.job_id)
        if stop:
            return stop
        lm_loop.fit(job, context, dataset, cfg.model_config(info.vocab_size, eos_id))
        final = context.artifacts.path(checkpoints.final_dir(job.job_id))
        if not final.is_dir():
            stop = context.store.stop_requested(job.job_id)
            if not stop:
                raise RuntimeError("training ended without writing the final model")
            return stop
        self._register(job, cfg, context, final, info)
        return DONE

    def _prepare(self, job: JobRecord, cfg: PretrainConfig, context: JobContext, eos_id: int, vocab: int) -> Path:
        """Clean, tokenise and pack the corpus once per job (a resumed job reuses it)."""
        out = context.artifacts.path(f"{DATASETS}/{job.job_id}")
        if (out / "manifest.json").exists():
            return out
        paths = [corpus_path(context, ref, i) for i, ref in enumerate(cfg.corpus)]
        context.store.log(job.job_id, f"preparing data from {cfg.corpus} with tokenizer {cfg.tokenizer}")
        prep = DataPrepConfig.from_dict(self._dataprep(cfg, paths, eos_id, vocab))
        with context.artifacts.staging(f"{DATASETS}/{job.job_id}") as tmp:
            report = prepare_dataset(prep, tmp, lambda texts: context.tokenizer.encode_batch(cfg.tokenizer, texts))
        for stage in report.stages:
            context.store.log(job.job_id, f"data {stage.name}: {stage.docs_in} in, {stage.docs_out} out")
        packed = report.packing
        assert packed is not None
        context.store.log(job.job_id, f"packed {packed.sequences} sequences of {cfg.seq_len} tokens")
        if packed.sequences < 2:
            raise InvalidArgument(f"the corpus gives {packed.sequences} sequences; need at least 2", field="corpus")
        return out

    @staticmethod
    def _register(job: JobRecord, cfg: PretrainConfig, context: JobContext, final: Path, info: TokenizerInfo) -> None:
        lineage = Lineage(
            job_id=job.job_id,
            tokenizer=info.ref,
            datasets=[*cfg.corpus, f"{DATASETS}/{job.job_id}"],
            config=job.config,
        )
        model = context.registry.register(
            cfg.model_name,
            final,
            context.artifacts.path(info.path, field="config.tokenizer"),
            lineage,
            context.store.get(job.job_id).metrics,
            cfg.shape(info.vocab_size).param_count(),
        )
        context.store.update(job.job_id, model=model.ref)
        context.store.log(job.job_id, f"registered model {model.ref}")
