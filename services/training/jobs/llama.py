"""The Llama-style decoder the causal-LM jobs build (pretraining, distillation's student, a sweep's models).

`transformers`' LlamaForCausalLM: RoPE, grouped-query attention (`num_kv_heads`), SwiGLU MLP and
RMSNorm. A job's config extends `LlamaShape`, which checks the shape and gives the model's config and
its size for memory and compute planning.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import LlamaConfig

from libs.common.planning import ModelShape
from services.training.dataprep.stage import require


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
