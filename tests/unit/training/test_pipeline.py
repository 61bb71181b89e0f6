"""Tokenisation, packing and the whole pipeline on real text with a BPE trained here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from libs.common.errors import InvalidArgument
from services.training.dataprep import (
    DataPrepConfig,
    Document,
    PackConfig,
    PackWriter,
    PipelineReport,
    StageStats,
    TokenizeConfig,
    TokenizeStage,
    build_pipeline,
    load_packed,
    prepare_dataset,
)


def test_tokenize_batches_documents_and_counts_tokens(topics: list[Document], encode_batch) -> None:
    calls: list[int] = []

    def counting(texts: list[str]) -> list[list[int]]:
        calls.append(len(texts))
        return encode_batch(texts)

    stage = TokenizeStage(TokenizeConfig(batch_size=8), counting)
    stats = StageStats(stage.name)
    docs = list(stage.run([*topics[:20], {"id": "empty", "text": ""}], stats))
    assert calls == [8, 8, 5]
    assert len(docs) == 20 and dict(stats.dropped) == {"no_tokens": 1}
    assert stats.counts["tokens"] == sum(len(d["tokens"]) for d in docs)
    assert docs[0]["tokens"] == encode_batch([topics[0]["text"]])[0]


def write_packed(token_lists: list[list[int]], tmp_path: Path, **config) -> tuple[dict, np.ndarray]:
    writer = PackWriter(PackConfig(**config), tmp_path)
    for tokens in token_lists:
        writer.add(tokens)
    writer.close()
    manifest, shards = load_packed(tmp_path)
    return manifest, np.concatenate(shards) if shards else np.empty((0, config["seq_len"]))


def test_packing_concatenates_with_eos_and_drops_the_tail(tmp_path: Path) -> None:
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]  # 3 + 2 + 4 tokens with EOS = 12
    manifest, seqs = write_packed(docs, tmp_path, seq_len=5, eos_id=1, vocab_size=100, sequences_per_shard=1)
    assert seqs.tolist() == [[5, 6, 7, 1, 8], [9, 1, 10, 11, 12]]
    assert seqs.dtype == np.uint16 and len(manifest["shards"]) == 2
    assert manifest["stats"] == {
        "documents": 3,
        "sequences": 2,
        "tokens_in": 12,
        "tokens_packed": 10,
        "tokens_dropped": 2,
        "pad_tokens": 0,
    }
    assert manifest["pad_id"] is None


def test_packing_can_pad_the_last_sequence(tmp_path: Path) -> None:
    manifest, seqs = write_packed(
        [[5, 6, 7], [8, 9]], tmp_path, seq_len=4, eos_id=1, pad_id=2, vocab_size=100, drop_last=False
    )
    assert seqs.tolist() == [[5, 6, 7, 1], [8, 9, 1, 2]]
    assert (manifest["stats"]["pad_tokens"], manifest["stats"]["tokens_packed"], manifest["pad_id"]) == (1, 7, 2)


def test_large_vocabularies_use_uint32_and_ids_are_checked(tmp_path: Path) -> None:
    manifest, seqs = write_packed([[70_000, 3]], tmp_path / "big", seq_len=3, eos_id=0, vocab_size=100_000)
    assert seqs.dtype == np.uint32 and seqs.tolist() == [[70_000, 3, 0]] and manifest["dtype"] == "uint32"
    writer = PackWriter(PackConfig(seq_len=4, vocab_size=1000), tmp_path / "small")
    with pytest.raises(InvalidArgument, match="vocab_size"):
        writer.add([5, 1000])


def test_pack_config_refuses_bad_values() -> None:
    with pytest.raises(InvalidArgument, match="seq_len"):
        PackConfig(seq_len=1)
    with pytest.raises(InvalidArgument, match="eos_id"):
        PackConfig(eos_id=70_000, vocab_size=65_536)


def test_pipeline_runs_stages_in_order_and_counts_each(topics: list[Document], encode_batch) -> None:
    mail = "Please write to us at ops@example.com if you have any questions about the order. " * 3
    dirty = [*topics[:10], topics[3], {"id": "pii", "text": mail}]
    pipeline = build_pipeline(
        [
            {"type": "normalize"},
            {"type": "exact_dedup"},
            {"type": "quality", "language": "en"},
            {"type": "pii"},
            {"type": "tokenize", "batch_size": 4},
        ],
        encode_batch,
    )
    report = PipelineReport()
    out = list(pipeline.run(dirty, report))
    names = [s.name for s in report.stages]
    assert names == ["normalize", "exact_dedup", "quality", "pii", "tokenize"]
    assert report.stage("exact_dedup").dropped == {"exact_duplicate": 1}
    assert report.stage("quality").docs_in == 11
    assert report.stage("pii").counts == {"EMAIL": 3}
    for earlier, later in zip(report.stages, report.stages[1:], strict=False):
        assert later.docs_in == earlier.docs_out
    assert len(out) == report.stages[-1].docs_out


def test_prepare_dataset_end_to_end_on_jsonl(
    tmp_path: Path, topics: list[Document], bpe: Tokenizer, encode_batch
) -> None:
    corpus = tmp_path / "corpus.jsonl"
    records = [{"id": d["id"], "text": d["text"]} for d in topics[:25]]
    records += [records[0], {"id": "pii", "text": "Mail alice@example.com or call +1 415-555-0132. " * 3}]
    corpus.write_text("\n".join(json.dumps(r) for r in records))
    eos = bpe.token_to_id("<|endoftext|>")
    job = DataPrepConfig.from_dict(
        {
            "source": {"type": "jsonl", "paths": [str(corpus)]},
            "stages": [
                {"type": "normalize"},
                {"type": "exact_dedup"},
                {"type": "near_dedup"},
                {"type": "quality", "min_chars": 20},
                {"type": "pii"},
                {"type": "tokenize"},
            ],
            "pack": {"seq_len": 128, "eos_id": eos, "vocab_size": bpe.get_vocab_size()},
        }
    )
    out = tmp_path / "packed"
    report = prepare_dataset(job, out, encode_batch)

    assert [s.name for s in report.stages] == [
        "read",
        "normalize",
        "exact_dedup",
        "near_dedup",
        "quality",
        "pii",
        "tokenize",
    ]
    assert report.stage("read").docs_out == 27
    assert report.stage("exact_dedup").dropped["exact_duplicate"] == 1
    assert report.stage("pii").counts == {"EMAIL": 3, "PHONE": 3}
    tokens = report.stage("tokenize").counts["tokens"]
    packing = report.packing
    assert packing.tokens_in == tokens + packing.documents
    assert packing.tokens_packed + packing.tokens_dropped == packing.tokens_in
    assert packing.tokens_dropped < 128

    manifest, shards = load_packed(out)
    seqs = np.concatenate(shards)
    assert seqs.shape == (packing.sequences, 128) and seqs.dtype == np.uint16
    assert int((seqs == eos).sum()) >= packing.documents - 1
    assert manifest["report"]["stages"] == report.to_dict()["stages"]
    text = bpe.decode(seqs.reshape(-1).tolist(), skip_special_tokens=False)
    assert "<EMAIL>" in text and "alice@example.com" not in text


def test_bad_job_is_refused_naming_the_field(tmp_path: Path) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "x"}\n')
    source = {"type": "jsonl", "paths": [str(corpus)]}
    cases = [
        ({"source": source, "stages": [{"type": "near_dedup", "threshold": 2}]}, r"stages\[0\]\.threshold"),
        ({"source": source, "stages": [{"type": "normalize"}, {"type": "sort"}]}, r"stages\[1\]\.type"),
        ({"source": source, "stages": [{"type": "quality", "min_len": 3}]}, r"stages\[0\]\.min_len"),
        ({"source": source, "stages": [{"type": "near_dedup", "threshold": "high"}]}, r"stages\[0\]: .*type"),
        ({"source": {"type": "csv"}, "stages": []}, r"source\.type"),
        ({"source": {**source, "paths": [str(tmp_path / "none")]}, "stages": []}, r"source\.paths"),
        ({"source": source, "stages": [{"type": "tokenize"}], "pack": {"seq_len": 0}}, r"pack\.seq_len"),
        ({"source": source, "stages": [], "pack": {}}, "pack"),
    ]
    for data, field in cases:
        with pytest.raises(InvalidArgument, match=field):
            DataPrepConfig.from_dict(data)


def test_tokenize_stage_needs_an_encoder() -> None:
    with pytest.raises(InvalidArgument, match="tokeniser"):
        build_pipeline([{"type": "tokenize"}])
