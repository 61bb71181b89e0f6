"""The data-preparation pipeline: a source, an ordered list of stages, and an optional packer.

A job is plain data, so it travels through YAML, gRPC and Ray unchanged::

    {
      "source": {"type": "jsonl", "paths": ["corpus.jsonl"], "text_field": "text"},
      "stages": [
        {"type": "normalize", "form": "NFKC"},
        {"type": "exact_dedup"},
        {"type": "near_dedup", "threshold": 0.8},
        {"type": "quality", "language": "en"},
        {"type": "pii"},
        {"type": "tokenize", "batch_size": 64}
      ],
      "pack": {"seq_len": 1024, "eos_id": 0, "vocab_size": 32000}
    }

Stages run in the order given, streaming one document at a time (tokenisation in batches), so
memory holds only the de-duplication indexes and one pending shard. ``prepare_dataset`` runs such a
job end to end and returns a :class:`PipelineReport` with counts for every stage.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from services.training.dataprep.dedup import ExactDedupConfig, ExactDedupStage
from services.training.dataprep.minhash import NearDedupConfig, NearDedupStage
from services.training.dataprep.normalize import NormalizeConfig, NormalizeStage
from services.training.dataprep.packing import PackConfig, PackStats, PackWriter
from services.training.dataprep.pii import PiiConfig, PiiStage
from services.training.dataprep.quality import QualityConfig, QualityStage
from services.training.dataprep.readers import SourceConfig, parse_source, read_documents
from services.training.dataprep.stage import Document, Stage, StageStats, field_prefix, parse_config, require
from services.training.dataprep.tokenize import EncodeBatch, TokenizeConfig, TokenizeStage

STAGES: dict[str, tuple[type[Any], type[Stage]]] = {
    "normalize": (NormalizeConfig, NormalizeStage),
    "exact_dedup": (ExactDedupConfig, ExactDedupStage),
    "near_dedup": (NearDedupConfig, NearDedupStage),
    "quality": (QualityConfig, QualityStage),
    "pii": (PiiConfig, PiiStage),
    "tokenize": (TokenizeConfig, TokenizeStage),
}


@dataclass
class PipelineReport:
    """Counts for the source, every stage in order, and packing."""

    stages: list[StageStats] = field(default_factory=list)
    packing: PackStats | None = None

    def stage(self, name: str) -> StageStats:
        """The first stage with this name."""
        return next(s for s in self.stages if s.name == name)

    def to_dict(self) -> dict[str, Any]:
        packing = None if self.packing is None else asdict(self.packing)
        return {"stages": [s.to_dict() for s in self.stages], "packing": packing}


class Pipeline:
    """Ordered stages run lazily over a document stream."""

    def __init__(self, stages: list[Stage]) -> None:
        self.stages = stages

    def run(self, docs: Iterable[Document], report: PipelineReport) -> Iterator[Document]:
        """The documents that survive every stage; each stage's counts are appended to ``report``."""
        stream: Iterable[Document] = docs
        for stage in self.stages:
            stats = StageStats(stage.name)
            report.stages.append(stats)
            stream = stage.run(stream, stats)
        return iter(stream)


def parse_stage(spec: dict[str, Any]) -> tuple[type[Stage], Any]:
    """The stage class and its config for ``{"type": name, ...config}``."""
    params = dict(spec)
    kind = params.pop("type", None)
    require(kind in STAGES, f"unknown stage type {kind!r}; expected one of {sorted(STAGES)}", "type")
    config_cls, stage_cls = STAGES[kind]
    return stage_cls, parse_config(config_cls, params)


def build_pipeline(specs: list[dict[str, Any]], encode_batch: EncodeBatch | None = None) -> Pipeline:
    """A pipeline from stage specs; bad config is reported as ``stages[i].<field>``."""
    stages = []
    for i, spec in enumerate(specs):
        with field_prefix(f"stages[{i}]"):
            stage_cls, config = parse_stage(spec)
            if not stage_cls.requires_encoder:
                stages.append(stage_cls(config))  # type: ignore[call-arg]
                continue
            require(encode_batch is not None, "this stage needs a tokeniser", "type")
            stages.append(stage_cls(config, encode_batch))  # type: ignore[call-arg]
    return Pipeline(stages)


@dataclass
class DataPrepConfig:
    """A whole data-preparation job."""

    source: dict[str, Any]
    """Source spec: ``{"type": "text_files" | "jsonl", "paths": [...], ...}``."""
    stages: list[dict[str, Any]]
    """Stage specs, run in this order."""
    pack: dict[str, Any] | None = None
    """Packing config (see PackConfig); requires a tokenize stage. None yields documents only."""

    def __post_init__(self) -> None:
        has_tokens = any(spec.get("type") == "tokenize" for spec in self.stages)
        require(self.pack is None or has_tokens, "packing needs a tokenize stage", "pack")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataPrepConfig:
        """A job from plain data, with every part checked so a bad job is refused before it starts."""
        config = parse_config(cls, data)
        config.parsed()
        return config

    def parsed(self) -> tuple[SourceConfig, list[tuple[type[Stage], Any]], PackConfig | None]:
        """Typed configs of the source, each stage and packing; raises InvalidArgument naming the field."""
        with field_prefix("source"):
            source = parse_source(self.source)
        stages = []
        for i, spec in enumerate(self.stages):
            with field_prefix(f"stages[{i}]"):
                stages.append(parse_stage(spec))
        with field_prefix("pack"):
            pack = None if self.pack is None else parse_config(PackConfig, self.pack)
        return source, stages, pack


def prepare_dataset(
    config: DataPrepConfig, out_dir: Path | str, encode_batch: EncodeBatch | None = None
) -> PipelineReport:
    """Run a job: read, clean, tokenise and pack into ``out_dir``; the report is also in the manifest.

    Without a ``pack`` config nothing is written: the documents are only counted (a dry run).
    """
    source, _, pack = config.parsed()
    pipeline = build_pipeline(config.stages, encode_batch)
    report = PipelineReport()
    read_stats = StageStats("read")
    report.stages.append(read_stats)
    docs = pipeline.run(read_documents(source, read_stats), report)
    if pack is None:
        for _ in docs:
            pass
        return report
    writer = PackWriter(pack, out_dir)
    for doc in docs:
        writer.add(doc["tokens"])
    report.packing = writer.stats
    writer.close(extra={"report": {"stages": [s.to_dict() for s in report.stages]}})
    return report
