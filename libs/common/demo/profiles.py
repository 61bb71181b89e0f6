"""How big the main job's run is: the tiny profile (tests), quick (the default, ~15 minutes on two
cores after installation) and full (larger models, longer training).

A profile is data: corpora sizes, tokeniser sizes, model shapes, steps. The stages read it and
nothing else, so a new profile is a new entry in PROFILES.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from libs.common.errors import InvalidArgument


@dataclass(frozen=True)
class Profile:
    name: str
    summary: str
    stdlib_files: int
    """Standard-library files in the code corpus (0: all, about 13 MB)."""
    pydoc_topics: int
    """Reference-text topics in the prose corpus and the collection (0: all 79)."""
    vocab_size: int
    """The model's tokeniser (byte-level BPE with a chat template)."""
    compare_vocab: int
    """Each of the four algorithms compared on the seed's sentence."""
    report_sizes: tuple[int, ...]
    """Vocabulary sizes of the trade-off report."""
    seq_len: int
    target: dict[str, int]
    """The served model's shape (LlamaShape settings)."""
    draft: dict[str, int]
    """The distilled draft's shape."""
    ladder: list[dict[str, int]]
    """The scaling sweep's models (at least three)."""
    distill_steps: int
    tokens_per_param: float
    """Training tokens per non-embedding parameter of the sweep's models and of the target (whose steps follow)."""
    micro_batch: int
    learning_rate: float
    align_steps: dict[str, int]
    """Steps of each alignment job type."""
    align_records: int
    """Alignment records used (train + held out)."""
    align_length: int
    """Tokens per alignment example."""
    num_workers: int = 1
    embedder: dict[str, Any] = field(default_factory=lambda: {"type": "sentence_transformers"})
    """The collection's dense embedder (retrieval's plugin spec; MiniLM by default)."""
    chunk_tokens: int = 96
    """Chunk size of the collection (embedder tokens): a RAG prompt must fit the model's context."""
    recall_questions: int = 60
    rag_questions: int = 3
    speed_prompts: int = 4
    new_tokens: int = 32
    heldout_texts: int = 4
    """Held-out passages (from the seed document) the perplexities are measured on."""
    heldout_tokens: int = 48


_LADDER = [
    {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1},
    {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2},
    {"hidden_size": 96, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2},
]

PROFILES: dict[str, Profile] = {
    p.name: p
    for p in [
        Profile(
            name="tiny",
            summary="for tests: tiny models, a slice of the corpora, a few minutes on two cores",
            stdlib_files=60,
            pydoc_topics=12,
            vocab_size=1000,
            compare_vocab=600,
            report_sizes=(300, 600, 1000),
            seq_len=256,  # room for a RAG prompt: the question, a cited chunk or two and the answer
            target={"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2},
            draft={"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1},
            ladder=[
                {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1},
                {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1},
                {"hidden_size": 48, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1},
            ],
            distill_steps=30,
            tokens_per_param=2.0,
            micro_batch=8,
            learning_rate=3e-3,
            align_steps={"sft": 12, "reward": 12, "dpo": 12, "ppo": 8},
            align_records=96,
            align_length=96,
            recall_questions=30,
            rag_questions=2,
            speed_prompts=2,
            new_tokens=16,
            heldout_texts=3,
            heldout_tokens=32,
            chunk_tokens=24,
            embedder={"type": "static"},  # MiniLM's token table without its layers: embeds in no time
        ),
        Profile(
            name="quick",
            summary="the default: small models on the real corpora, about 15 minutes on two cores",
            stdlib_files=400,
            pydoc_topics=0,
            vocab_size=4000,
            compare_vocab=4000,
            report_sizes=(1000, 2000, 4000, 8000),
            seq_len=256,
            target={"hidden_size": 128, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2},
            draft={"hidden_size": 64, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1},
            ladder=_LADDER,
            distill_steps=120,
            tokens_per_param=2.0,
            micro_batch=8,
            learning_rate=2e-3,
            align_steps={"sft": 60, "reward": 40, "dpo": 40, "ppo": 30},
            align_records=400,
            align_length=160,
        ),
        Profile(
            name="full",
            summary="larger models on all of the corpora (an hour or more on two cores)",
            stdlib_files=0,
            pydoc_topics=0,
            vocab_size=8000,
            compare_vocab=8000,
            report_sizes=(2000, 4000, 8000, 16000, 32000),
            seq_len=256,
            target={"hidden_size": 256, "num_layers": 6, "num_heads": 8, "num_kv_heads": 4},
            draft={"hidden_size": 96, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2},
            ladder=[*_LADDER, {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2}],
            distill_steps=400,
            tokens_per_param=20.0,
            micro_batch=16,
            learning_rate=1e-3,
            align_steps={"sft": 200, "reward": 120, "dpo": 120, "ppo": 100},
            align_records=0,
            align_length=256,
            num_workers=2,
            recall_questions=200,
            rag_questions=5,
            speed_prompts=8,
            new_tokens=64,
            heldout_texts=8,
            heldout_tokens=96,
        ),
    ]
}


def profile(name: str) -> Profile:
    if name not in PROFILES:
        raise InvalidArgument(f"unknown profile {name!r}; expected one of {sorted(PROFILES)}", field="profile")
    return PROFILES[name]
