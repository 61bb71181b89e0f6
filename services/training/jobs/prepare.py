"""Data preparation as a job of its own: clean, de-duplicate, filter, redact, tokenise and pack a corpus once.

A job config, as submitted (only `tokenizer` and `corpus` are required):

    {"tokenizer": "code", "corpus": ["stdlib"], "seq_len": 256,
     "stages": [{"type": "normalize"}, {"type": "exact_dedup"}, {"type": "near_dedup"},
                {"type": "quality", "min_chars": 200}, {"type": "pii"}]}

The driver runs `services.training.dataprep` (tokenising through the tokeniser service over gRPC)
and writes the packed data set to `datasets/<job id>` in the artifact store, with each stage's
counts in the job's log and metrics. Pretraining, masked-LM, distillation and sweep jobs then take
`"dataset": "<job id>"` in place of `corpus` and train on it as is, however many of them there are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from services.training.dataprep.packing import MANIFEST
from services.training.dataprep.stage import require
from services.training.jobs import DONE, JobContext, parse_config
from services.training.jobs.data import DataConfig, causal_data, check_causal_data
from services.training.jobstore import JobRecord


@dataclass(kw_only=True)
class PrepareConfig(DataConfig):
    """A corpus, the stages that clean it, and the packing."""

    seq_len: int = 256
    """Tokens per packed sequence: the `seq_len` of the causal-LM jobs that will train on it (a masked-LM
    job's seq_len less 2, for its [CLS] and [SEP])."""
    eos_token: str = ""
    """Special token that ends each document; "" picks the first of the usual ones the tokeniser has."""

    def __post_init__(self) -> None:
        require(not self.dataset, "a prepare job prepares corpora; it takes no prepared dataset", "dataset")
        self.check_data()
        require(self.seq_len >= 2, "must be >= 2", "seq_len")


class PrepareJob:
    def check(self, config: dict[str, Any], context: JobContext) -> dict[str, Any]:
        """Refuse what cannot run; returns the config with the tokeniser pinned to its version."""
        cfg = parse_config(PrepareConfig, config)
        return {**config, "tokenizer": check_causal_data(cfg, context, cfg.seq_len).ref}

    def run(self, job: JobRecord, context: JobContext) -> str:
        cfg = parse_config(PrepareConfig, job.config)
        _, _, dataset = causal_data(job, cfg, context, cfg.seq_len)
        manifest = json.loads((dataset / MANIFEST).read_text())
        metrics = {f"{stage['name']}_docs_out": float(stage["docs_out"]) for stage in manifest["report"]["stages"]}
        metrics.update({key: float(value) for key, value in manifest["stats"].items()})
        ref = context.artifacts.relative(dataset)
        context.store.update(job.job_id, metrics=metrics, dataset=ref)
        context.store.log(job.job_id, f"data set {ref}: {manifest['stats']['sequences']} sequences of {cfg.seq_len}")
        return DONE
