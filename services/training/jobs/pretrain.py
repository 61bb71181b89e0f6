"""Causal-LM pretraining from scratch: a Llama-style model on a corpus, with Ray Train across workers.

A job config, as submitted (only `tokenizer`, `corpus` or `dataset`, and `model_name` are required):

    {"tokenizer": "code", "corpus": ["stdlib"], "model_name": "tiny-code",
     "hidden_size": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "seq_len": 256,
     "micro_batch_size": 8, "grad_accum_steps": 2, "max_steps": 1000, "learning_rate": 3e-4,
     "warmup_steps": 100, "num_workers": 2, "checkpoint_every": 100}

The driver (`PretrainJob.run`, in the service or in a RayJob's driver pod) prepares the data with
`services.training.dataprep` (tokenising through the tokeniser service over gRPC), or takes the
data set a `prepare` job wrote (`"dataset": "<its job id>"` in place of `corpus`), runs
`lm_loop.train_loop` on `num_workers` Ray Train workers under DDP, and registers the finished model.
The model is `transformers`' LlamaForCausalLM: RoPE, grouped-query attention (`num_kv_heads`),
SwiGLU MLP and RMSNorm.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from llmp.tokenizer.v1.tokenizer_pb2 import TokenizerInfo
from transformers import LlamaConfig

from libs.common.artifacts import check_name
from libs.common.errors import InvalidArgument, NotFound, Unavailable
from libs.common.planning import GB, ModelShape, TrainingMemory, training_memory
from services.training import checkpoints
from services.training.dataprep import DataPrepConfig, prepare_dataset
from services.training.dataprep.packing import MANIFEST
from services.training.dataprep.stage import field_prefix, require
from services.training.jobs import DONE, JobContext, check_gpu, lm_loop, parse_config
from services.training.jobs.lm_loop import LoopConfig
from services.training.jobstore import JobRecord
from services.training.registry import Lineage

DATASETS = "datasets"
SOURCE = "source.json"  # beside a prepared data set's manifest: the tokeniser and corpora it came from
EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "[SEP]")


@dataclass(kw_only=True)
class LlamaShape:
    """A Llama-style decoder (RoPE, GQA, SwiGLU, RMSNorm), as pretraining and distillation build it."""

    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention); must divide num_heads."""
    intermediate_size: int = 0
    """SwiGLU width; 0: 8/3 of hidden_size rounded up to a multiple of 64."""
    rope_theta: float = 10000.0
    tie_embeddings: bool = False

    def check_shape(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads"):
            require(getattr(self, name) >= 1, "must be >= 1", name)
        require(self.hidden_size % self.num_heads == 0, "must be a multiple of num_heads", "hidden_size")
        require((self.hidden_size // self.num_heads) % 2 == 0, "must give an even head size (RoPE)", "hidden_size")
        require(self.num_heads % self.num_kv_heads == 0, "must divide num_heads", "num_kv_heads")
        require(self.intermediate_size >= 0, "must be >= 0", "intermediate_size")
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

    def model_config(self, vocab_size: int, eos_id: int, max_positions: int) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.mlp_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=max_positions,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            tie_word_embeddings=self.tie_embeddings,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
        )


@dataclass(kw_only=True)
class DataConfig:
    """Where the text comes from and how it is cleaned (see services.training.dataprep)."""

    tokenizer: str
    """Tokeniser reference in the tokeniser service ("name" or "name:version")."""
    corpus: list[str] = field(default_factory=list)
    """Corpus names (from UploadCorpus) or folders/files relative to the artifact store."""
    dataset: str = ""
    """Instead of `corpus`: a data set a `prepare` job wrote (its job id, or its path in the store), used as is.
    It must have been tokenised by `tokenizer` into sequences of the length this job trains on."""
    stages: list[dict[str, Any]] = field(default_factory=lambda: [{"type": "normalize"}, {"type": "exact_dedup"}])
    """Data-preparation stages before tokenising (see services.training.dataprep)."""

    def check_data(self) -> None:
        require(bool(self.tokenizer), "is required", "tokenizer")
        require(
            bool(self.corpus) != bool(self.dataset),
            "give corpora to prepare or a prepared dataset, one of them",
            "corpus",
        )


@dataclass(kw_only=True)
class PretrainConfig(DataConfig, LlamaShape, LoopConfig):
    """Everything a pretraining job needs; defaults give a small model."""

    model_name: str
    """Name under which the finished model is registered."""
    eos_token: str = ""
    """Special token that ends each document; "" picks the first of EOS_TOKENS the tokeniser has."""

    def __post_init__(self) -> None:
        check_name(self.model_name, "model_name")
        self.check_data()
        super().__post_init__()
        self.check_shape()

    def model_config(self, vocab_size: int, eos_id: int, max_positions: int = 0) -> LlamaConfig:
        return super().model_config(vocab_size, eos_id, max_positions or self.seq_len)


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


def end_of_document_token(cfg: PretrainConfig | Any, info: TokenizerInfo) -> str:
    """The special token appended after every document: `eos_token`, else the first usual one present."""
    return special_token(info, cfg.eos_token, EOS_TOKENS, "eos_token", "end-of-document")


def special_token(info: TokenizerInfo, chosen: str, usual: tuple[str, ...], field_name: str, role: str) -> str:
    """`chosen` if the tokeniser has it as a special token, else the first of `usual` it has; refused otherwise."""
    if chosen:
        if chosen not in info.special_tokens:
            raise InvalidArgument(f"{chosen!r} is not a special token of {info.ref}", field=f"config.{field_name}")
        return chosen
    found = next((t for t in usual if t in info.special_tokens), None)
    if found is None:
        raise InvalidArgument(
            f"{info.ref} has no {role} token (none of {usual}; its special tokens: {list(info.special_tokens)}); "
            f"use a tokenizer with one or name it in {field_name}",
            field=f"config.{field_name}",
        )
    return found


def token_id(context: JobContext, tokenizer: str, token: str) -> int:
    return int(context.tokenizer.encode(tokenizer, token, add_special_tokens=False).ids[0])


def dataprep(cfg: DataConfig, paths: list[Path], seq_len: int, eos_id: int, vocab_size: int) -> dict[str, Any]:
    return {
        "source": {"type": "text_files", "paths": [str(p) for p in paths]},
        "stages": [*cfg.stages, {"type": "tokenize", "batch_size": 16}],
        "pack": {"seq_len": seq_len, "eos_id": eos_id, "vocab_size": vocab_size},
    }


def check_data(cfg: DataConfig, context: JobContext, seq_len: int, info: TokenizerInfo) -> None:
    """The corpus exists and the data-preparation stages are valid, or the prepared data set fits the job."""
    if cfg.dataset:
        prepared_dataset(context, cfg.dataset, info.ref, seq_len)
        return
    paths = [corpus_path(context, ref, i) for i, ref in enumerate(cfg.corpus)]
    with field_prefix("config"):
        DataPrepConfig.from_dict(dataprep(cfg, paths, seq_len, 0, info.vocab_size))


def check_causal_data(cfg: DataConfig | Any, context: JobContext, seq_len: int) -> TokenizerInfo:
    """At submission, for a job that packs documents each ended by an end-of-document token: the tokeniser
    exists and has that token, and the data (corpus or prepared set) fit; returns the tokeniser's description."""
    info = describe_tokenizer(context, cfg.tokenizer)
    end_of_document_token(cfg, info)
    check_data(cfg, context, seq_len, info)
    return info


def causal_data(
    job: JobRecord, cfg: DataConfig | Any, context: JobContext, seq_len: int, vocab: int = 0
) -> tuple[TokenizerInfo, int, Path]:
    """When the job runs: (tokeniser description, end-of-document id, packed data set), the set prepared now
    or taken as given (`vocab`: the ids' bound when not the tokeniser's)."""
    info = describe_tokenizer(context, cfg.tokenizer)
    eos_id = token_id(context, cfg.tokenizer, end_of_document_token(cfg, info))
    return info, eos_id, prepare_data(job, cfg, context, seq_len, eos_id, vocab or info.vocab_size)


def prepared_dataset(context: JobContext, ref: str, tokenizer: str, seq_len: int, eos_id: int | None = None) -> Path:
    """A complete data set a prepare job wrote (`ref`: its job id or its path in the store), tokenised by
    `tokenizer` into sequences of `seq_len` tokens, each document ended by `eos_id` (when given)."""
    name = "config.dataset"
    path = context.artifacts.path(ref if "/" in ref else f"{DATASETS}/{ref}", field=name)
    if not (path / MANIFEST).is_file() or not (path / SOURCE).is_file():
        raise NotFound(f"no prepared data set {ref!r} in the artifact store (a prepare job's id or path)", field=name)
    manifest = json.loads((path / MANIFEST).read_text())
    made_with = json.loads((path / SOURCE).read_text())["tokenizer"]
    if made_with != tokenizer:
        raise InvalidArgument(f"data set {ref!r} was tokenised by {made_with}, not {tokenizer}", field=name)
    if manifest["seq_len"] != seq_len:
        raise InvalidArgument(
            f"data set {ref!r} holds sequences of {manifest['seq_len']} tokens; this job needs {seq_len}", field=name
        )
    if eos_id is not None and manifest["eos_id"] != eos_id:
        raise InvalidArgument(
            f"data set {ref!r} ends documents with token {manifest['eos_id']}; this job needs {eos_id}", field=name
        )
    return path


def check_memory(context: JobContext, need: TrainingMemory, extra: int = 0, what: str = "the model size") -> None:
    """Refuse a job whose worker would need more than a worker has (`extra`: e.g. a frozen teacher)."""
    total = need.total + extra
    if total > context.worker_memory_bytes:
        raise InvalidArgument(
            f"training needs {total / GB:.2f} GB per worker (weights {need.weights / GB:.2f}, optimiser "
            f"{need.optimizer / GB:.2f}, activations {need.activations / GB:.2f}, other {extra / GB:.2f}) but a "
            f"worker has {context.worker_memory_bytes / GB:.2f} GB; lower micro_batch_size, seq_len or {what}",
            field="config.micro_batch_size",
        )


def prepare_data(job: JobRecord, cfg: DataConfig, context: JobContext, seq_len: int, eos_id: int, vocab: int) -> Path:
    """Clean, tokenise and pack the corpus once per job (a resumed job reuses it), or take the prepared data set."""
    if cfg.dataset:
        return prepared_dataset(context, cfg.dataset, cfg.tokenizer, seq_len, eos_id)
    out = context.artifacts.path(f"{DATASETS}/{job.job_id}")
    if (out / MANIFEST).exists():
        return out
    paths = [corpus_path(context, ref, i) for i, ref in enumerate(cfg.corpus)]
    context.store.log(job.job_id, f"preparing data from {cfg.corpus} with tokenizer {cfg.tokenizer}")
    prep = DataPrepConfig.from_dict(dataprep(cfg, paths, seq_len, eos_id, vocab))
    with context.artifacts.staging(f"{DATASETS}/{job.job_id}") as tmp:
        report = prepare_dataset(prep, tmp, lambda texts: context.tokenizer.encode_batch(cfg.tokenizer, texts))
        (tmp / SOURCE).write_text(json.dumps({"tokenizer": cfg.tokenizer, "corpus": cfg.corpus}))
    for stage in report.stages:
        context.store.log(job.job_id, f"data {stage.name}: {stage.docs_in} in, {stage.docs_out} out")
    packed = report.packing
    assert packed is not None
    context.store.log(job.job_id, f"packed {packed.sequences} sequences of {seq_len} tokens")
    if packed.sequences < 2:
        raise InvalidArgument(f"the corpus gives {packed.sequences} sequences; need at least 2", field="corpus")
    return out


def train_and_register(
    job: JobRecord,
    context: JobContext,
    dataset: Path,
    objective: lm_loop.Objective,
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
    metrics = lm_loop.fit(job, context, dataset, objective, cfg.loop())
    if metrics is None:
        stop = context.store.stop_requested(job.job_id)
        if not stop:
            raise RuntimeError("training ended without writing the final model")
        return stop
    context.store.update(job.job_id, metrics=metrics)
    lineage = Lineage(
        job_id=job.job_id,
        tokenizer=info.ref,
        parent=parent,
        datasets=[*cfg.corpus, context.artifacts.relative(dataset)],
        config=job.config,
    )
    model = context.registry.register(
        cfg.model_name,
        context.artifacts.path(checkpoints.final_dir(job.job_id)),
        context.artifacts.path(info.path, field="config.tokenizer"),
        lineage,
        metrics,
        parameters,
    )
    context.store.update(job.job_id, model=model.ref)
    context.store.log(job.job_id, f"registered model {model.ref}")
    return DONE


class PretrainJob:
    def check(self, config: dict[str, Any], context: JobContext) -> dict[str, Any]:
        """Refuse what cannot run; returns the config with the tokeniser pinned to its version."""
        cfg = parse_config(PretrainConfig, config)
        check_gpu(cfg.use_gpu, context)
        info = check_causal_data(cfg, context, cfg.seq_len)
        check_memory(
            context, training_memory(cfg.shape(info.vocab_size), cfg.micro_batch_size, cfg.seq_len, precision="fp32")
        )
        return {**config, "tokenizer": info.ref}

    def run(self, job: JobRecord, context: JobContext) -> str:
        cfg = parse_config(PretrainConfig, job.config)
        info, eos_id, dataset = causal_data(job, cfg, context, cfg.seq_len)
        objective = lm_loop.CausalLM(cfg.model_config(info.vocab_size, eos_id))
        return train_and_register(job, context, dataset, objective, cfg, info, cfg.shape(info.vocab_size).param_count())
