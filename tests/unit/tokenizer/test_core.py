"""The tokeniser core, called directly (no transport): training, encoding, bad input, atomicity."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from libs.common import corpora
from libs.common.artifacts import ArtifactStore
from libs.common.errors import AlreadyExists, InvalidArgument, NotFound
from services.tokenizer.config import TokenizerConfig
from services.tokenizer.core import Padding, TokenizerCore, Truncation
from services.tokenizer.training import CANCELLED, SUCCEEDED

TOPICS = [text for _, text in corpora.pydoc_topics()]
TRAIN, HELDOUT = TOPICS[::2], TOPICS[1::2]


@pytest.fixture
def core(tmp_path: Path) -> TokenizerCore:
    return TokenizerCore(TokenizerConfig(max_batch=64, max_text_bytes=200_000), ArtifactStore(tmp_path / "artifacts"))


async def _chunks(name: str, texts: list[str], fail_after: int | None = None) -> AsyncIterator[tuple[str, str, bool]]:
    for i, text in enumerate(texts):
        if fail_after is not None and i == fail_after:
            raise ConnectionError("client went away")
        yield name, text, True


def upload(core: TokenizerCore, name: str, texts: list[str]) -> None:
    asyncio.run(core.upload_corpus(_chunks(name, texts)))


def train(core: TokenizerCore, name: str, algorithm: str, vocab_size: int = 1000, **kwargs: object) -> str:
    status = core.train(name, algorithm, vocab_size, **kwargs)
    final = core.jobs.wait(status.job_id, timeout=120)
    assert final.state == SUCCEEDED, final.error
    return final.tokenizer


def nothing_half_written(core: TokenizerCore) -> bool:
    return not list((core.artifacts.root / ".staging").iterdir())


@pytest.mark.parametrize("algorithm", ["bpe", "byte_level_bpe", "wordpiece", "unigram"])
def test_each_algorithm_trains_and_round_trips(core: TokenizerCore, algorithm: str) -> None:
    upload(core, "topics", TRAIN)
    ref = train(core, "t", algorithm, corpus_refs=["topics"])
    assert ref == "t:1"
    info = core.describe("t")
    assert info.algorithm == algorithm and info.vocab_size == 1000 and info.corpus_bytes > 100_000
    sample = HELDOUT[:16]
    encodings = core.encode_batch("t", sample)
    decoded = core.decode_batch("t", [e.ids for e in encodings])
    if algorithm == "wordpiece":  # lower-cases and splits punctuation: decoding is stable, not exact
        assert [e.ids for e in core.encode_batch("t", decoded)] == [e.ids for e in encodings]
    else:
        normalizer = core.tokenizers.load("t").tokenizer.normalizer
        expected = [normalizer.normalize_str(s) if normalizer else s for s in sample]
        assert [d.split() for d in decoded] == [e.split() for e in expected]
    assert nothing_half_written(core)


def test_versions_accumulate_and_delete(core: TokenizerCore) -> None:
    train(core, "v", "byte_level_bpe", 400, texts=TRAIN[:20])
    train(core, "v", "byte_level_bpe", 500, texts=TRAIN[:20])
    assert [i.ref for i in core.list_tokenizers()] == ["v:1", "v:2"]
    assert core.describe("v").vocab_size == 500 and core.describe("v:1").vocab_size == 400
    assert core.delete("v:1") == ["v:1"]
    assert core.delete("v") == ["v:2"]
    with pytest.raises(NotFound):
        core.describe("v")


def test_offsets_truncation_padding(core: TokenizerCore) -> None:
    train(core, "wp", "wordpiece", 800, texts=TRAIN)
    enc = core.encode("wp", "Tokenisers split words.")
    assert enc.tokens[0] == "[CLS]" and enc.tokens[-1] == "[SEP]"
    assert all(
        "Tokenisers split words."[s:e].lower().startswith(t.lstrip("#")[:1])
        for t, (s, e) in zip(enc.tokens[1:-1], enc.offsets[1:-1], strict=True)
    )
    short = core.encode_batch("wp", HELDOUT[:4], truncation=Truncation(max_length=16, stride=4))
    assert all(len(e.ids) == 16 and e.tokens[-1] == "[SEP]" for e in short)
    assert short[0].overflowing, "the rest of a long text comes back as overflowing windows"
    padded = core.encode_batch("wp", ["a b", "a b c d e f"], padding=Padding())
    assert len(padded[0].ids) == len(padded[1].ids)
    assert padded[0].attention_mask[-1] == 0 and padded[1].attention_mask[-1] == 1
    left = core.encode_batch("wp", ["a", "a b c"], padding=Padding(length=8, direction="left"))
    assert [len(e.ids) for e in left] == [8, 8] and left[0].attention_mask[0] == 0


def test_chat_template(core: TokenizerCore) -> None:
    train(core, "chat", "byte_level_bpe", 600, texts=TRAIN[:30], chat_template="default")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text, ids = core.apply_chat_template("chat", messages, add_generation_prompt=True)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    im_start = core.tokenizers.load("chat").tokenizer.token_to_id("<|im_start|>")
    assert ids.count(im_start) == 3, "special tokens in the template encode as single tokens"
    with pytest.raises(InvalidArgument, match=r"messages\[0\].role"):
        core.apply_chat_template("chat", [{"role": "wizard", "content": "x"}])
    train(core, "plain", "byte_level_bpe", 300, texts=TRAIN[:5])
    with pytest.raises(InvalidArgument, match="no chat template"):
        core.apply_chat_template("plain", messages)


def test_bad_training_input_is_refused_and_writes_nothing(core: TokenizerCore, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="corpus: give corpus"):
        core.train("x", "bpe", 1000)
    with pytest.raises(InvalidArgument, match="corpus: the corpus is empty"):
        core.train("x", "bpe", 1000, texts=["", "  "])
    with pytest.raises(NotFound, match=r"corpus\[0\]"):
        core.train("x", "bpe", 1000, corpus_refs=["missing"])
    with pytest.raises(InvalidArgument, match="vocab_size: 50 is smaller than the alphabet"):
        core.train("x", "wordpiece", 50, texts=TRAIN)
    with pytest.raises(InvalidArgument, match="256 bytes"):
        core.train("x", "byte_level_bpe", 200, texts=["abc"])
    with pytest.raises(InvalidArgument, match="unknown tokenizers plugin"):
        core.train("x", "sentencepiece-magic", 1000, texts=["abc"])
    with pytest.raises(InvalidArgument, match="name"):
        core.train("../x", "bpe", 1000, texts=["abc"])
    with pytest.raises(InvalidArgument, match="vocab_size: must be positive"):
        core.train("x", "bpe", 0, texts=["abc"])
    bad = core.artifacts.root / "raw" / "latin1.txt"
    bad.parent.mkdir()
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(InvalidArgument, match=r"raw/latin1.txt is not valid UTF-8 \(byte 3"):
        core.train("x", "bpe", 1000, corpus_refs=["raw/latin1.txt"])
    assert core.list_tokenizers() == [] and nothing_half_written(core)


def test_one_name_is_never_trained_twice_at_once(core: TokenizerCore) -> None:
    upload(core, "big", TOPICS * 4)
    first = core.train("same", "unigram", 4000, corpus_refs=["big"])
    with pytest.raises(AlreadyExists, match="already being trained"):
        core.train("same", "bpe", 1000, texts=TRAIN)
    assert core.jobs.wait(first.job_id, 120).state == SUCCEEDED
    train(core, "same", "bpe", 1000, texts=TRAIN)  # free again once the first has ended


def test_cancel_leaves_nothing(core: TokenizerCore) -> None:
    upload(core, "big", TOPICS * 8)
    status = core.train("slow", "unigram", 8000, corpus_refs=["big"])
    cancelled = core.cancel_training(status.job_id)
    assert cancelled.state == CANCELLED
    assert core.artifacts.versions("tokenizers", "slow") == [] and nothing_half_written(core)


def test_bad_encode_and_decode_input(core: TokenizerCore) -> None:
    train(core, "b", "byte_level_bpe", 300, texts=TRAIN[:5])
    with pytest.raises(NotFound, match="tokenizer: no tokenizer named 'nope'"):
        core.encode("nope", "x")
    with pytest.raises(InvalidArgument, match="texts: 65 items exceed the batch limit of 64"):
        core.encode_batch("b", ["x"] * 65)
    with pytest.raises(InvalidArgument, match=r"texts\[1\]: text of 200001 bytes"):
        core.encode_batch("b", ["ok", "x" * 200_001])
    with pytest.raises(InvalidArgument, match=r"ids\[0\]: token id 300 is outside the vocabulary \(size 300\)"):
        core.decode("b", [1, 300])
    with pytest.raises(InvalidArgument, match="padding: tokenizer b:1 has no pad token"):
        core.encode_batch("b", ["x"], padding=Padding())
    with pytest.raises(InvalidArgument, match=r"truncation\.strategy"):
        core.encode_batch("b", ["x"], truncation=Truncation(4, strategy="sideways"))


def test_failed_upload_leaves_no_corpus(core: TokenizerCore) -> None:
    with pytest.raises(ConnectionError):
        asyncio.run(core.upload_corpus(_chunks("half", TOPICS[:10], fail_after=5)))
    assert not (core.artifacts.root / "corpora" / "half").exists() and nothing_half_written(core)
    upload(core, "half", TOPICS[:10])
    with pytest.raises(AlreadyExists):
        upload(core, "half", TOPICS[:10])


def test_vocab_report_trades_tokens_for_embedding_size(core: TokenizerCore) -> None:
    rows = list(core.vocab_report([], TOPICS, "byte_level_bpe", [300, 1000, 4000], embedding_dim=64))
    assert [r.vocab_size for r in rows] == [300, 1000, 4000]
    per_char = [r.tokens_per_char for r in rows]
    assert per_char[0] > per_char[1] > per_char[2], "a larger vocabulary needs fewer tokens"
    assert [r.embedding_params for r in rows] == [r.actual_vocab_size * 64 for r in rows]
    assert rows[0].embedding_bytes == rows[0].embedding_params * 2
