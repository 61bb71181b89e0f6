"""Causal-LM pretraining from scratch: a Llama-style model on a corpus, with Ray Train across workers.

A job config, as submitted (only `tokenizer`, `corpus` or `dataset`, and `model_name` are required):

    {"tokenizer": "code", "corpus": ["stdlib"], "model_name": "tiny-code",
     "hidden_size": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "seq_len": 256,
     "micro_batch_size": 8, "grad_accum_steps": 2, "max_steps": 1000, "learning_rate": 3e-4,
     "warmup_steps": 100, "num_workers": 2, "checkpoint_every": 100}

The driver (`PretrainJob.run`, in the service or in a RayJob's driver pod) prepares the data with
`services.training.dataprep` (tokenising through the tokeniser service over gRPC), or takes the
data set a `prepare` job wrote (`"dataset": "<its job id>"` in place of `corpus`; see `data`), runs
`lm_loop.train_loop` on `num_workers` Ray Train workers under DDP, and registers the finished model.
The model is `transformers`' LlamaForCausalLM (see `llama`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import LlamaConfig

from libs.common.artifacts import check_name
from libs.common.planning import training_memory
from services.training.jobs import JobContext, lm_loop, parse_config
from services.training.jobs.data import DataConfig, causal_data, check_causal_data
from services.training.jobs.llama import LlamaShape
from services.training.jobs.lm_loop import LoopConfig
from services.training.jobs.resources import check_gpu, check_memory
from services.training.jobstore import JobRecord


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
        parameters = cfg.shape(info.vocab_size).param_count()
        return lm_loop.train_and_register(job, context, dataset, objective, cfg, info, parameters)
