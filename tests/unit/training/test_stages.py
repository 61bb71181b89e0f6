"""Readers, normalisation, exact de-duplication and quality filters, on real and crafted text."""

from __future__ import annotations

import asyncio
import json
import unicodedata
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from libs.common.artifacts import ArtifactStore
from libs.common.errors import InvalidArgument
from services.tokenizer import corpus
from services.training.dataprep import (
    Document,
    ExactDedupConfig,
    ExactDedupStage,
    JsonlConfig,
    NormalizeConfig,
    NormalizeStage,
    QualityConfig,
    QualityStage,
    StageStats,
    TextFilesConfig,
    read_documents,
)
from services.training.dataprep.quality import failed_rule


def run(stage, docs: list[Document]) -> tuple[list[Document], StageStats]:
    stats = StageStats(stage.name)
    return list(stage.run(docs, stats)), stats


def test_text_files_reads_matching_files_and_counts_undecodable(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("beta")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa not utf-8")
    (tmp_path / "skip.md").write_text("not matched")
    stats = StageStats("read")
    docs = list(read_documents(TextFilesConfig(paths=[str(tmp_path)]), stats))
    assert [(d["id"], d["text"]) for d in docs] == [("a.txt", "alpha"), ("sub/b.txt", "beta")]
    assert (stats.docs_in, stats.docs_out, dict(stats.dropped)) == (3, 2, {"unreadable": 1})


def test_an_uploaded_corpus_is_read_one_document_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Documents with blank lines of their own, sent in several chunks, across shards, survive the upload whole."""
    documents = [f"Document {i}.\n\nIts second paragraph, é ∑ {i}.\n\n\nAnd a third." * (1 + i % 3) for i in range(12)]
    documents[5] = "one line"

    async def chunks() -> AsyncIterator[tuple[str, str, bool]]:
        for text in documents:  # each document in two chunks: only the first starts a document
            half = len(text) // 2
            yield "mixed", text[:half], True
            yield "mixed", text[half:], False

    monkeypatch.setattr(corpus, "SHARD_BYTES", 200)
    store = ArtifactStore(tmp_path / "artifacts")
    _, _, count = asyncio.run(corpus.upload(store, chunks()))
    folder = store.root / "corpora" / "mixed"
    assert count == 12 and len(list(folder.glob("*.txt"))) > 1
    stats = StageStats("read")
    docs = list(read_documents(TextFilesConfig(paths=[str(folder)]), stats))
    assert [d["text"] for d in docs] == documents
    assert len({d["id"] for d in docs}) == 12 and docs[0]["id"] == "part-00000.txt#0"
    assert (stats.docs_in, stats.docs_out) == (12, 12)
    # the tokeniser still trains on the shards as plain text: every document's text is in them
    shards = "".join(p.read_text() for p in sorted(folder.glob("*.txt")))
    assert all(text in shards for text in documents)


def test_a_folder_with_another_kind_of_manifest_is_read_a_file_at_a_time(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": ["part-00000.bin"], "seq_len": 8}))
    (tmp_path / "notes.txt").write_text("first\n\nsecond")
    stats = StageStats("read")
    docs = list(read_documents(TextFilesConfig(paths=[str(tmp_path)]), stats))
    assert [(d["id"], d["text"]) for d in docs] == [("notes.txt", "first\n\nsecond")]


def test_jsonl_uses_the_configured_fields_and_keeps_the_rest_as_meta(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    lines = [
        json.dumps({"key": "k1", "body": "first", "lang": "en"}),
        "{not json",
        json.dumps({"key": "k2", "title": "no body"}),
        "",
        json.dumps({"body": "third"}),
    ]
    path.write_text("\n".join(lines))
    stats = StageStats("read")
    docs = list(read_documents(JsonlConfig(paths=[str(path)], text_field="body", id_field="key"), stats))
    assert docs == [{"id": "k1", "text": "first", "meta": {"lang": "en"}}, {"id": "data.jsonl:5", "text": "third"}]
    assert dict(stats.dropped) == {"bad_json": 1, "missing_text": 1}


def test_reader_refuses_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="paths"):
        JsonlConfig(paths=[str(tmp_path / "absent.jsonl")])


def test_normalize_composes_unicode_and_cleans_whitespace() -> None:
    decomposed = "Cafe\u0301  \r\nline\u200b two \t\n\n\n\n\nend\x00"
    (doc,), stats = run(NormalizeStage(NormalizeConfig()), [{"id": "1", "text": decomposed}])
    assert doc["text"] == "Caf\u00e9\nline two\n\n\nend"
    assert unicodedata.is_normalized("NFC", doc["text"])
    assert stats.docs_changed == 1


def test_nfkc_folds_compatibility_forms_and_code_indentation_survives() -> None:
    stage = NormalizeStage(NormalizeConfig(form="NFKC"))
    (wide, code), _ = run(
        stage,
        [
            {"id": "w", "text": "\uff21\uff22\uff23 \ufb01le\u00a0x"},
            {"id": "c", "text": "def f():\n    return 1\n"},
        ],
    )
    assert wide["text"] == "ABC file x"
    assert code["text"] == "def f():\n    return 1"


def test_normalize_drops_documents_left_empty_and_leaves_clean_ones_untouched() -> None:
    clean = {"id": "ok", "text": "already clean"}
    kept, stats = run(NormalizeStage(NormalizeConfig()), [clean, {"id": "blank", "text": " \n\t\n "}])
    assert kept == [clean] and kept[0] is clean
    assert (stats.docs_changed, dict(stats.dropped)) == (0, {"empty": 1})


def test_exact_dedup_ignores_case_and_spacing_and_keeps_first(topics: list[Document]) -> None:
    original = topics[0]
    copy = {"id": "copy", "text": "  " + original["text"].upper().replace(" ", "   ")}
    kept, stats = run(ExactDedupStage(ExactDedupConfig()), [original, *topics[1:10], copy, original])
    assert [d["id"] for d in kept] == [d["id"] for d in topics[:10]]
    assert dict(stats.dropped) == {"exact_duplicate": 2}


def test_exact_dedup_can_be_strict_about_case() -> None:
    kept, _ = run(
        ExactDedupStage(ExactDedupConfig(casefold=False)),
        [
            {"id": "a", "text": "Same words"},
            {"id": "b", "text": "same words"},
        ],
    )
    assert len(kept) == 2


def test_english_reference_text_passes_quality_with_the_language_rule(topics: list[Document]) -> None:
    kept, stats = run(QualityStage(QualityConfig(language="en")), topics)
    assert stats.docs_in == len(topics)
    assert len(kept) >= 0.9 * len(topics)


def test_language_rule_rejects_code_and_other_languages(stdlib_docs: list[Document]) -> None:
    config = QualityConfig(
        language="en", max_symbol_word_ratio=None, max_repeated_line_fraction=None, min_alpha_fraction=None
    )
    failures = [failed_rule(d["text"], config) for d in stdlib_docs if len(d["text"]) > 2000]
    assert failures.count("language") >= 0.8 * len(failures)
    french = (
        "Le chat est assis sur le tapis et il regarde les oiseaux dans le jardin pendant que la pluie "
        "tombe doucement sur les toits de la ville, puis nous sommes partis pour la gare."
    )
    assert failed_rule(french, config) == "language"


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("short", "too_short"),
        ("x" * 200, "too_long"),
        ("# heading " * 10, "symbol_ratio"),
        ("1234 5678 9012 3456 7890 " * 5, "alpha_fraction"),
        ("buy now and save\n" * 6 + "once\n", "repeated_lines"),
    ],
)
def test_each_quality_rule_drops_what_it_targets(text: str, rule: str) -> None:
    config = QualityConfig(min_chars=20, max_chars=150)
    assert failed_rule(text, config) == rule


def test_disabled_rules_let_anything_through() -> None:
    off = QualityConfig(
        min_chars=None,
        max_chars=None,
        max_symbol_word_ratio=None,
        min_alpha_fraction=None,
        max_repeated_line_fraction=None,
    )
    assert failed_rule("#" * 5, off) is None


def test_bad_quality_config_names_the_field() -> None:
    with pytest.raises(InvalidArgument, match="min_alpha_fraction"):
        QualityConfig(min_alpha_fraction=1.5)
    with pytest.raises(InvalidArgument, match="language"):
        QualityConfig(language="fr")
