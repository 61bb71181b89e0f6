"""Chunkers on real text: offsets point back at the source, sizes hold, structure is respected."""

from __future__ import annotations

import inspect
import itertools
from pathlib import Path

import pytest

from libs.common.errors import InvalidArgument
from services.retrieval import core as core_module
from services.retrieval.chunkers import CHUNKERS, Chunk
from services.retrieval.tokens import LocalTokens

SEED = (Path(core_module.__file__).parent / "eval" / "seed.md").read_text()
CODE = inspect.getsource(core_module)


def check_offsets(text: str, chunks: list[Chunk]) -> None:
    assert chunks
    for i, c in enumerate(chunks):
        assert c.index == i
        assert text[c.start : c.end] == c.text and c.text.strip() == c.text


def test_fixed_windows_have_size_and_overlap(minilm_tokens: LocalTokens) -> None:
    chunks = CHUNKERS.create({"type": "fixed", "size": 64, "overlap": 16}).split(SEED, "markdown", minilm_tokens)
    check_offsets(SEED, chunks)
    counts = minilm_tokens.count([c.text for c in chunks])
    assert max(counts) <= 64 + 2 and min(counts[:-1]) >= 60  # re-tokenising a slice may merge an edge token
    for a, b in itertools.pairwise(chunks):
        assert b.start < a.end  # overlap
    assert chunks[-1].end == len(SEED.rstrip())


def test_recursive_follows_headings_and_keeps_code_fences(minilm_tokens: LocalTokens) -> None:
    chunks = CHUNKERS.create({"type": "recursive", "size": 200}).split(SEED, "markdown", minilm_tokens)
    check_offsets(SEED, chunks)
    assert all(n <= 200 for n in minilm_tokens.count([c.text for c in chunks]))
    speculative = [c for c in chunks if c.section.endswith("Speculative Decoding")]
    assert speculative and speculative[0].text.startswith("### Speculative Decoding")
    # A fenced block that fits is never cut (smaller sizes split big ones by lines, on purpose).
    whole = CHUNKERS.create({"type": "recursive", "size": 1000}).split(SEED, "markdown", minilm_tokens)
    assert all(c.text.count("```") % 2 == 0 for c in whole)


def test_recursive_splits_code_at_definitions(minilm_tokens: LocalTokens) -> None:
    chunks = CHUNKERS.create({"type": "recursive", "size": 400}).split(CODE, "code", minilm_tokens)
    check_offsets(CODE, chunks)
    starts = {c.section: c.text.splitlines()[0] for c in chunks}
    assert starts["point_id"].startswith("def point_id")
    assert any(s.startswith("@dataclass") for s in starts.values())


def test_sentences_end_at_sentence_boundaries(minilm_tokens: LocalTokens) -> None:
    text = "One sentence here. Another one follows! Is this a third? " * 30
    chunks = CHUNKERS.create({"type": "sentences", "size": 40, "overlap": 1}).split(text, "text", minilm_tokens)
    check_offsets(text, chunks)
    assert all(c.text[-1] in ".!?" for c in chunks)
    assert chunks[1].start < chunks[0].end  # one sentence repeated


def test_oversized_paragraph_falls_back_to_windows(minilm_tokens: LocalTokens) -> None:
    text = "word " * 500
    chunks = CHUNKERS.create({"type": "recursive", "size": 50}).split(text, "text", minilm_tokens)
    check_offsets(text, chunks)
    assert len(chunks) == 10


@pytest.mark.parametrize(
    "spec", [{"type": "fixed", "size": 0}, {"type": "fixed", "size": 8, "overlap": 8}, {"type": "nope"}]
)
def test_bad_specs_name_the_field(spec: dict) -> None:
    with pytest.raises(InvalidArgument, match="chunker"):
        CHUNKERS.create(spec, field="chunker")
