"""Models for the inference benchmark, trained here on real text and cached between runs.

A byte-level BPE tokenizer and two Llama models sharing it (a target and a smaller draft) are
trained on the Python standard library's source and pydoc's reference text for a few minutes; the
last files of the corpus are held out for perplexity and prompts. Everything is kept under
~/.cache/llmp-bench/engine/<profile>/ (HF folders that transformers loads), so reruns skip training.
The >= 100M-parameter model used for memory-bandwidth and quantised-speed figures has random
weights: how fast a weight is read does not depend on its value.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM

from libs.common import corpora

CACHE = Path.home() / ".cache" / "llmp-bench" / "engine"
HELD_OUT_FILES = 40
"""The last stdlib files in sorted order, never trained on."""


@dataclass(frozen=True)
class Profile:
    """Sizes and training budgets; `quick` is a smoke run of the whole benchmark."""

    name: str
    vocab: int
    target: dict[str, Any]
    draft: dict[str, Any]
    target_seconds: float
    draft_seconds: float
    seq_len: int
    batch: int
    corpus_files: int | None


FULL = Profile(
    "full",
    vocab=4096,
    target=dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=4, intermediate_size=512),
    draft=dict(hidden_size=128, num_hidden_layers=1, num_attention_heads=4, intermediate_size=384),
    target_seconds=180,
    draft_seconds=60,
    seq_len=128,
    batch=8,
    corpus_files=None,
)
QUICK = Profile(
    "quick",
    vocab=512,
    target=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
    draft=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
    target_seconds=3,
    draft_seconds=2,
    seq_len=64,
    batch=8,
    corpus_files=150,
)


@dataclass
class Corpus:
    train: list[str]
    held_out: list[str]


def corpus(profile: Profile) -> Corpus:
    files = [text for _, text in corpora.stdlib_source(profile.corpus_files)]
    docs = [text for _, text in corpora.pydoc_topics()]
    held = files[-HELD_OUT_FILES:] if profile.corpus_files is None else files[-10:]
    return Corpus(files[: len(files) - len(held)] + docs, held)


def tokenizer(profile: Profile, texts: list[str]) -> Tokenizer:
    path = CACHE / profile.name / "tokenizer.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=profile.vocab,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return tok


def llama(profile: Profile, sizes: dict[str, Any], max_positions: int = 1024) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=profile.vocab,
        max_position_embeddings=max_positions,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=False,
        **sizes,
    )
    return LlamaForCausalLM(config)


def train(model: LlamaForCausalLM, ids: torch.Tensor, profile: Profile, seconds: float) -> tuple[int, float]:
    """AdamW with warm-up and cosine decay on random windows for a wall-clock budget -> (steps, last loss)."""
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.95))
    model.train()
    start, step, loss_value = time.perf_counter(), 0, float("nan")
    while (elapsed := time.perf_counter() - start) < seconds:
        frac = elapsed / seconds
        for group in opt.param_groups:
            group["lr"] = 3e-3 * min(1.0, 20 * frac) * 0.5 * (1 + math.cos(math.pi * frac))
        starts = torch.randint(0, len(ids) - profile.seq_len - 1, (profile.batch,), generator=gen)
        batch = torch.stack([ids[s : s + profile.seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step, loss_value = step + 1, float(loss.detach())
    model.eval().requires_grad_(False)
    return step, loss_value


@dataclass
class Models:
    tokenizer: Tokenizer
    target: LlamaForCausalLM
    draft: LlamaForCausalLM
    held_out: list[str]


def trained_models(profile: Profile, log: bool = True) -> Models:
    texts = corpus(profile)
    tok = tokenizer(profile, texts.train)
    loaded = {}
    for role, sizes, seconds in (
        ("target", profile.target, profile.target_seconds),
        ("draft", profile.draft, profile.draft_seconds),
    ):
        directory = CACHE / profile.name / role
        if (directory / "config.json").is_file():
            loaded[role] = LlamaForCausalLM.from_pretrained(directory).eval().requires_grad_(False)
            continue
        ids = torch.tensor([t for enc in tok.encode_batch(texts.train) for t in [*enc.ids, 0]])
        torch.manual_seed(0)
        model = llama(profile, sizes)
        steps, loss = train(model, ids, profile, seconds)
        if log:
            params = sum(p.numel() for p in model.parameters()) / 1e6
            print(f"trained {role} ({params:.1f}M parameters): {steps} steps in {seconds:.0f} s, loss {loss:.3f}")
        model.save_pretrained(directory, safe_serialization=True)
        loaded[role] = model
    return Models(tok, loaded["target"], loaded["draft"], texts.held_out)


BIG: dict[str, Any] = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=2048)
"""About 134M parameters with a 32k vocabulary and an untied head."""


def big_model(quick: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    if quick:
        sizes: dict[str, Any] = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
        return llama(QUICK, sizes, 512).eval().requires_grad_(False)
    config = LlamaConfig(vocab_size=32000, max_position_embeddings=1024, tie_word_embeddings=False, **BIG)
    return LlamaForCausalLM(config).eval().requires_grad_(False)
