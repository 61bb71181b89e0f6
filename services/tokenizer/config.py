"""Settings of the tokeniser service (section `tokenizer` of the config file, LLMP_TOKENIZER_*)."""

from __future__ import annotations

from dataclasses import dataclass

from libs.common.config import ServiceConfig, doc


@dataclass
class TokenizerConfig(ServiceConfig):
    port: int = doc("gRPC port", 50051)
    metrics_port: int = doc("Prometheus port; -1 turns metrics off", 51051)
    max_batch: int = doc("most texts or sequences in one batched call", 4096)
    max_text_bytes: int = doc("largest single text to encode", 16 << 20)
    cache_size: int = doc("tokenisers kept loaded in memory", 16)
    max_training_jobs: int = doc("training jobs that run at once", 2)
