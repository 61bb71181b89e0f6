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
    import_roots: list[str] = doc(
        "folders Import may read absolute paths from; empty: none (callers send the file's bytes)",
        default_factory=list,
    )
    max_import_bytes: int = doc("largest file Import reads or accepts (tokenizer.json, .model, vocab.txt)", 64 << 20)
    max_chat_template_chars: int = doc("longest chat template", 65536)
    chat_render_seconds: float = doc("longest a chat template may render", 2.0)
    max_output_tokens: int = doc("most token ids one encode call returns, padding and overflow included", 1 << 22)
    max_report_bytes: int = doc("most corpus bytes a vocabulary report trains on, summed over its sizes", 256 << 20)
    max_overflow_windows: int = doc("most overflow windows one encode call may make (truncation with stride)", 65536)
