"""Models for the inference benchmark, trained here on real text and cached between runs.

A byte-level BPE tokenizer and two Llama models sharing it are trained on the Python standard
library's source and pydoc's reference text; the last files of the corpus are held out for
perplexity and prompts. The target (12 layers) is trained on next-token cross-entropy; the draft
(1 narrow layer, so that a draft step costs about a tenth of a target step) is distilled from the
target: its loss is the KL divergence from the target's next-token distributions, with a little
plain cross-entropy, as in services/training/jobs/distill.py. That makes its argmax agree with the
target's far more often than a draft trained on the text alone, which is what greedy speculative
decoding accepts. Training takes about 6 minutes on 2 cores; everything is kept under
~/.cache/llmp-bench/engine/<profile>-<digest>/ (HF folders that transformers loads), the digest
covering the profile and the code that trains, so reruns skip training and a changed recipe retrains.
The >= 100M-parameter model used for memory-bandwidth, KV-cache and quantised-speed figures has
random weights: how fast a weight is read does not depend on its value.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
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
    target_steps: int
    draft_steps: int
    seq_len: int
    batch: int
    corpus_files: int | None
    lr: float = 3e-3
    distill_temperature: float = 1.0
    """The KL divergence compares both distributions softened by it (1: as greedy drafting sees them)."""
    hard_label_weight: float = 0.1
    """Share of the draft's loss that is plain next-token cross-entropy on the text."""
    continuations: int = 128
    """Greedy continuations by the target of training-text prompts; half of each draft batch is cut from them."""


FULL = Profile(
    "full",
    vocab=4096,
    target=dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=4, intermediate_size=512),
    draft=dict(hidden_size=128, num_hidden_layers=1, num_attention_heads=4, intermediate_size=384),
    target_steps=360,
    draft_steps=300,
    seq_len=256,
    batch=4,
    corpus_files=None,
)
QUICK = Profile(
    "quick",
    vocab=512,
    target=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
    draft=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
    target_steps=20,
    draft_steps=20,
    seq_len=64,
    batch=8,
    corpus_files=150,
    continuations=8,
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


def tokenizer(profile: Profile, texts: list[str], path: Path) -> Tokenizer:
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


def kl_divergence(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student), from logits [..., vocab]."""
    log_q, log_p = F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1)
    return F.kl_div(log_q.flatten(0, -2), log_p.flatten(0, -2), log_target=True, reduction="batchmean")


def batch_loss(
    model: LlamaForCausalLM, batch: torch.Tensor, profile: Profile, teacher: LlamaForCausalLM | None
) -> torch.Tensor:
    """Next-token cross-entropy, or with a teacher mostly the KL divergence from its softened distributions
    (scaled by the temperature squared, so gradients keep their size)."""
    out = model(input_ids=batch, labels=batch)
    if teacher is None:
        return out.loss
    with torch.no_grad():
        target_logits = teacher(input_ids=batch).logits  # [batch, seq, vocab]
    t, hard = profile.distill_temperature, profile.hard_label_weight
    kl = kl_divergence(out.logits / t, target_logits / t) * t * t
    return (1 - hard) * kl + hard * out.loss


def target_continuations(target: LlamaForCausalLM, ids: torch.Tensor, profile: Profile) -> torch.Tensor:
    """[profile.continuations, seq_len]: random training windows of seq_len / 4 tokens, each continued greedily
    by the target. Speculative decoding at temperature 0 asks the draft to predict exactly such text, loops
    and all, which teacher-forced real text alone rarely shows it."""
    gen = torch.Generator().manual_seed(1)
    prompt_len = profile.seq_len // 4
    starts = torch.randint(0, len(ids) - prompt_len, (profile.continuations,), generator=gen)
    prompts = torch.stack([ids[s : s + prompt_len] for s in starts.tolist()])
    new = profile.seq_len - prompt_len
    with torch.inference_mode():
        return target.generate(  # type: ignore[operator]
            prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new, min_new_tokens=new, do_sample=False
        )


def train(
    model: LlamaForCausalLM,
    ids: torch.Tensor,
    profile: Profile,
    steps: int,
    teacher: LlamaForCausalLM | None = None,
    continuations: torch.Tensor | None = None,
) -> float:
    """AdamW with warm-up and cosine decay on random windows for a number of steps -> the last loss.
    With `continuations` [n, seq_len], the second half of each batch's rows are drawn from them instead.

    A step budget, not a wall-clock one: the models, and so the figures measured on them, do not
    depend on how busy the machine was while they were trained.
    """
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=profile.lr, weight_decay=0.01, betas=(0.9, 0.95))
    model.train()
    loss_value = float("nan")
    for step in range(steps):
        frac = step / steps
        for group in opt.param_groups:
            group["lr"] = profile.lr * min(1.0, 20 * frac) * 0.5 * (1 + math.cos(math.pi * frac))
        starts = torch.randint(0, len(ids) - profile.seq_len - 1, (profile.batch,), generator=gen)
        batch = torch.stack([ids[s : s + profile.seq_len] for s in starts.tolist()])
        if continuations is not None:
            half = profile.batch // 2
            batch[half:] = continuations[torch.randint(0, len(continuations), (profile.batch - half,), generator=gen)]
        loss = batch_loss(model, batch, profile, teacher)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).isfinite():  # else skip: one inf spoils every weight
            opt.step()
        loss_value = float(loss.detach())
    model.eval().requires_grad_(False)
    return loss_value


def agreement(draft: LlamaForCausalLM, target: LlamaForCausalLM, windows: torch.Tensor) -> float:
    """Share of positions of `windows` [n, seq] where the draft's most likely next token is the target's:
    about the per-token acceptance rate of greedy drafting."""
    with torch.inference_mode():
        same = draft(input_ids=windows).logits.argmax(-1) == target(input_ids=windows).logits.argmax(-1)
    return float(same.float().mean())


@dataclass
class Models:
    tokenizer: Tokenizer
    target: LlamaForCausalLM
    draft: LlamaForCausalLM
    held_out: list[str]


def cache_dir(profile: Profile) -> Path:
    """CACHE/<profile>-<digest of the profile and of the code that trains the models>."""
    recipe: list[Callable[..., Any]] = [
        corpus,
        tokenizer,
        token_ids,
        llama,
        kl_divergence,
        batch_loss,
        target_continuations,
        train,
        trained_models,
    ]
    text = repr(profile) + "".join(inspect.getsource(f) for f in recipe)
    return CACHE / f"{profile.name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def trained_models(profile: Profile, log: bool = True) -> Models:
    """The target, then the draft distilled from it: each loaded from the cache or trained and saved there."""
    directory = cache_dir(profile)
    texts = corpus(profile)
    tok = tokenizer(profile, texts.train, directory / "tokenizer.json")
    ids: torch.Tensor | None = None
    loaded: dict[str, LlamaForCausalLM] = {}
    for role, sizes, steps in (
        ("target", profile.target, profile.target_steps),
        ("draft", profile.draft, profile.draft_steps),
    ):
        if (directory / role / "config.json").is_file():
            loaded[role] = LlamaForCausalLM.from_pretrained(directory / role).eval().requires_grad_(False)
            continue
        if ids is None:
            ids = token_ids(tok, texts.train)
        torch.manual_seed(0)
        model = llama(profile, sizes)
        teacher = loaded["target"] if role == "draft" else None
        start = time.perf_counter()
        continuations = target_continuations(teacher, ids, profile) if teacher else None
        loss = train(model, ids, profile, steps, teacher, continuations)
        if log:
            params = sum(p.numel() for p in model.parameters()) / 1e6
            how = "distilled from the target" if teacher else "trained"
            print(
                f"{how}: {role} ({params:.1f}M parameters), {steps} steps in {time.perf_counter() - start:.0f} s, "
                f"loss {loss:.3f}"
            )
        model.save_pretrained(directory / role, safe_serialization=True)
        loaded[role] = model
    if log and ids is not None:
        held = token_ids(tok, texts.held_out)
        windows = held.unfold(0, profile.seq_len, (len(held) - profile.seq_len) // 16)[:16]  # [16, seq_len]
        rate = agreement(loaded["draft"], loaded["target"], windows)
        print(f"held-out top-1 agreement of the draft with the target: {rate:.1%}")
    return Models(tok, loaded["target"], loaded["draft"], texts.held_out)


def token_ids(tok: Tokenizer, texts: list[str]) -> torch.Tensor:
    """The texts' tokens in one row, each text followed by <|endoftext|> (id 0)."""
    return torch.cat([torch.tensor([*enc.ids, 0]) for enc in tok.encode_batch(texts)])


BIG: dict[str, Any] = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=2048)
"""About 134M parameters with a 32k vocabulary and an untied head."""


def big_model(quick: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    if quick:
        sizes: dict[str, Any] = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
        return llama(QUICK, sizes, 512).eval().requires_grad_(False)
    config = LlamaConfig(vocab_size=32000, max_position_embeddings=1024, tie_word_embeddings=False, **BIG)
    return LlamaForCausalLM(config).eval().requires_grad_(False)
