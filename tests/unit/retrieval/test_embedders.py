"""Embedder plugins: the packaged MiniLM, its static embedding matrix, a causal LM from the store, BM25."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from libs.common.artifacts import ArtifactStore
from libs.common.errors import InvalidArgument
from services.retrieval.embedders import BM25, EMBEDDERS, packaged_minilm

TEXTS = ["A cat sits on the mat.", "Speculative decoding uses a small draft model."]


def test_static_is_normalised_and_not_contextual() -> None:
    static = EMBEDDERS.create({"type": "static"}, field="embedder")
    rows = static.embed(TEXTS)
    assert rows.shape == (2, 384) and np.allclose(np.linalg.norm(rows, axis=1), 1, atol=1e-5)
    # No context: word order does not matter to a mean of embedding rows.
    a, b = static.embed(["dog bites man", "man bites dog"])
    assert np.allclose(a, b)


def test_sentence_transformers_matches_the_library() -> None:
    from sentence_transformers import SentenceTransformer

    ours = EMBEDDERS.create({"type": "sentence_transformers"}, field="embedder").embed(TEXTS)
    theirs = SentenceTransformer(str(packaged_minilm()), device="cpu").encode(TEXTS, normalize_embeddings=True)
    assert np.allclose(ours, theirs, atol=1e-5)
    embedder = EMBEDDERS.create({"type": "sentence_transformers"}, field="embedder")
    a, b = embedder.embed(["dog bites man", "man bites dog"])
    assert not np.allclose(a, b)


def test_hf_causal_pools_a_model_from_the_store(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    store = ArtifactStore(tmp_path)
    folder = tmp_path / "models" / "tiny"
    GPT2LMHeadModel(GPT2Config(vocab_size=30522, n_embd=32, n_layer=2, n_head=2, n_positions=128)).save_pretrained(
        folder, safe_serialization=True
    )
    shutil.copy(packaged_minilm() / "tokenizer.json", folder / "tokenizer.json")
    embedder = EMBEDDERS.create({"type": "hf_causal", "path": "models/tiny"}, field="embedder", artifacts=store)
    rows = embedder.embed(TEXTS * 3)
    assert rows.shape == (6, 32) and np.allclose(rows[0], rows[2], atol=1e-5)
    with pytest.raises(InvalidArgument, match=r"embedder\.path"):
        EMBEDDERS.create({"type": "hf_causal", "path": "../outside"}, field="embedder", artifacts=store)


def test_bm25_weights_saturate_and_hash_stably() -> None:
    bm25 = BM25()
    doc = bm25.document("tokens tokens tokens tokenizer and the")
    weights = dict(zip(doc.indices, doc.values, strict=True))
    assert len(weights) == 2  # stopwords dropped
    assert weights[BM25.index("tokens")] > weights[BM25.index("tokenizer")]
    assert weights[BM25.index("tokens")] < 3 * weights[BM25.index("tokenizer")]  # saturation
    assert bm25.query("Tokens, tokens!").indices == [BM25.index("tokens")]


def test_unknown_embedder_names_the_field() -> None:
    with pytest.raises(InvalidArgument, match=r"embedder\.type"):
        EMBEDDERS.create({"type": "word2vec"}, field="embedder")


def test_qdrant_bm25_stems_drops_stop_words_and_saturates() -> None:
    bm25 = EMBEDDERS.create({"type": "qdrant_bm25"})
    assert bm25.query("Running runs") == bm25.query("run")  # one stemmed term, weight 1
    assert len(bm25.query("the cat and the dog").indices) == 2  # "the", "and" are stop words
    once, thrice = bm25.document("cache"), bm25.document("cache cache cache")
    assert once.indices == thrice.indices and once.values[0] < thrice.values[0] < 3 * once.values[0]
    with pytest.raises(InvalidArgument, match="sparse_embedder"):
        EMBEDDERS.create({"type": "qdrant_bm25", "language": "klingon"})
