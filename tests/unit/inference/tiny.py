"""Tiny models of every supported architecture (built from configs, random weights) and prompts."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig

from libs.common.artifacts import ArtifactStore

torch.set_num_threads(2)

VOCAB = 256
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=VOCAB)
NO_SPECIAL = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
CONFIGS = {
    "llama": lambda: LlamaConfig(**SMALL, num_key_value_heads=2, **NO_SPECIAL),
    "mistral": lambda: MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=8, **NO_SPECIAL),
    "gpt2": lambda: GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=256, **NO_SPECIAL),
    "gpt_neox": lambda: GPTNeoXConfig(**SMALL, rotary_pct=0.5, **NO_SPECIAL),
}


def save_model(store: ArtifactStore, arch: str, name: str | None = None) -> str:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch]())
    relative = f"models/{name or arch}/1"
    model.save_pretrained(store.root / relative, safe_serialization=True)
    return relative


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


NEEDS_COMPILER = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None,
    reason="torch.compile needs a C++ compiler (c++ or g++); none is on PATH",
)
