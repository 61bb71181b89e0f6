"""A job's training data: corpora cleaned, tokenised and packed once per job, or a set a `prepare` job wrote.

A job's config extends `DataConfig` (`tokenizer`, and `corpus` or `dataset`). At submission,
`check_causal_data` checks that the tokeniser exists with an end-of-document token and that the
data fit the job; when the job runs, `causal_data` gives the packed data set (under
`datasets/<job_id>/`, reused by a resumed job; see `services.training.dataprep`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmp.tokenizer.v1.tokenizer_pb2 import TokenizerInfo

from libs.common.errors import InvalidArgument, NotFound
from services.training.dataprep import DataPrepConfig, prepare_dataset
from services.training.dataprep.packing import MANIFEST
from services.training.dataprep.stage import field_prefix, require
from services.training.jobs import JobContext
from services.training.jobs.tokenizer import describe_tokenizer, end_of_document_token, token_id
from services.training.jobstore import JobRecord

DATASETS = "datasets"
SOURCE = "source.json"  # beside a prepared data set's manifest: the tokeniser and corpora it came from


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


def corpus_path(context: JobContext, ref: str, index: int) -> Path:
    """A corpus name (corpora/<name>) or a path relative to the store, which must exist."""
    field_name = f"config.corpus[{index}]"
    named = context.artifacts.path(f"corpora/{ref}", field=field_name)
    path = named if named.is_dir() else context.artifacts.path(ref, field=field_name)
    if not path.exists():
        raise NotFound(f"no corpus {ref!r} in the artifact store", field=field_name)
    return path


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
