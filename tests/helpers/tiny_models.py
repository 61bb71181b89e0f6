"""Tiny models built from configs (random weights, seeded), the only builder the tests use, and prompts.

`save_model` saves one of every supported architecture (no tokeniser); `save_tiny_model` saves the
byte-level Llama the service tests load: the same tiny Llama with a tokeniser of one id per byte
(and, when asked, a chat template).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig

from libs.common.artifacts import ArtifactStore

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


TINY = "models/tiny/1"
CHAT_TEMPLATE = (  # a ChatML template, as the tokeniser service's "default" one
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_tiny_model(root: Path, relative: str = TINY, context: int = 128, chat_template: str = "") -> Path:
    """The 2-layer Llama of CONFIGS over a byte-level tokenizer (256 ids, one per byte), saved as the store keeps it."""
    folder = root / relative
    torch.manual_seed(0)
    config = LlamaConfig(**SMALL, num_key_value_heads=2, max_position_embeddings=context, **NO_SPECIAL)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, safe_serialization=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(folder / "tokenizer.json"))
    if chat_template:
        (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": chat_template}))
    return folder


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


NEEDS_COMPILER = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None,
    reason="torch.compile needs a C++ compiler (c++ or g++); none is on PATH",
)
NEEDS_KERNEL = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None,
    reason="the engine's attention kernel is built on first use with a C++ compiler (c++ or g++); none is on PATH",
)
