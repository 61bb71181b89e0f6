"""Stand-ins for the tokeniser service and the model registry in the training jobs' submission checks."""

from __future__ import annotations

import json
from pathlib import Path

import grpc

from libs.common.errors import NotFound
from services.training.registry import Lineage, ModelInfo

EOS = "<|endoftext|>"


class TokenizerNotFound(grpc.RpcError):
    """What the tokeniser service's client raises for a tokeniser it does not have."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.NOT_FOUND


class TargetRegistry:
    """Stands in for the model registry: one causal LM, "target:1", trained with bpe:1."""

    def __init__(self, root: Path) -> None:
        self.folder = root / "models" / "target" / "1"
        self.folder.mkdir(parents=True)
        config = {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 600,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 192,
            "max_position_embeddings": 128,
        }
        (self.folder / "config.json").write_text(json.dumps(config))

    def get(self, ref: str) -> ModelInfo:
        if not ref.startswith("target"):
            raise NotFound(f"no model named {ref!r}", field="model")
        lineage = Lineage(job_id="train-1", tokenizer="bpe:1", datasets=["topics", "datasets/train-1"])
        return ModelInfo("target", 1, "models/target/1", lineage)

    def path(self, ref: str) -> Path:
        return self.folder
