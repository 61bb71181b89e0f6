"""Data preparation for pretraining: read, normalise, de-duplicate, filter, redact, tokenise and pack.

A plain library with no transport: the training service runs :func:`prepare_dataset` inside a job
and passes the tokeniser service's client as ``encode_batch``. Each stage is also usable alone.

    report = prepare_dataset(DataPrepConfig.from_dict(job), out_dir, encode_batch=client.encode_batch)
"""

from services.training.dataprep.dedup import ExactDedupConfig, ExactDedupStage
from services.training.dataprep.minhash import (
    LshIndex,
    MinHasher,
    NearDedupConfig,
    NearDedupStage,
    estimate_jaccard,
    shingle_hashes,
)
from services.training.dataprep.normalize import NormalizeConfig, NormalizeStage
from services.training.dataprep.packing import PackConfig, PackStats, PackWriter, load_packed
from services.training.dataprep.pii import PiiConfig, PiiRedactor, PiiStage
from services.training.dataprep.pipeline import (
    STAGES,
    DataPrepConfig,
    Pipeline,
    PipelineReport,
    build_pipeline,
    prepare_dataset,
)
from services.training.dataprep.quality import QualityConfig, QualityStage
from services.training.dataprep.readers import JsonlConfig, TextFilesConfig, read_documents
from services.training.dataprep.stage import Document, Stage, StageStats
from services.training.dataprep.tokenize import EncodeBatch, TokenizeConfig, TokenizeStage

__all__ = [
    "STAGES",
    "DataPrepConfig",
    "Document",
    "EncodeBatch",
    "ExactDedupConfig",
    "ExactDedupStage",
    "JsonlConfig",
    "LshIndex",
    "MinHasher",
    "NearDedupConfig",
    "NearDedupStage",
    "NormalizeConfig",
    "NormalizeStage",
    "PackConfig",
    "PackStats",
    "PackWriter",
    "PiiConfig",
    "PiiRedactor",
    "PiiStage",
    "Pipeline",
    "PipelineReport",
    "QualityConfig",
    "QualityStage",
    "Stage",
    "StageStats",
    "TextFilesConfig",
    "TokenizeConfig",
    "TokenizeStage",
    "build_pipeline",
    "estimate_jaccard",
    "load_packed",
    "prepare_dataset",
    "read_documents",
    "shingle_hashes",
]
