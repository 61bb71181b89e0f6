"""Masked-LM, distillation and sweep jobs: checks at submission, BERT masking, the distillation loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from llmp.tokenizer.v1 import tokenizer_pb2 as tok_pb

from libs.common.errors import InvalidArgument, NotFound
from libs.common.planning import GB
from services.training.jobs import JobContext, job_type
from services.training.jobs.distill import kl_per_position
from services.training.jobs.mlm import IGNORE, MaskedLM, MaskedLMConfig
from services.training.jobs.sweep import SweepConfig, plan_ladder
from tests.helpers.training import TargetRegistry, TokenizerNotFound

TOKENIZERS = {
    "bpe": tok_pb.TokenizerInfo(
        name="bpe", version=1, ref="bpe:1", vocab_size=600, special_tokens=["<|endoftext|>"], path="tokenizers/bpe/1"
    ),
    "wp": tok_pb.TokenizerInfo(
        name="wp",
        version=2,
        ref="wp:2",
        vocab_size=600,
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
        path="tokenizers/wp/2",
    ),
}
MLM = {"tokenizer": "wp", "corpus": ["topics"], "model_name": "bert", "hidden_size": 64, "num_layers": 2}
SWEEP: dict[str, Any] = {
    "tokenizer": "bpe",
    "corpus": ["topics"],
    "sizes": [{"hidden_size": 16, "num_layers": 1}, {"hidden_size": 32}, {"hidden_size": 64}],
    "seq_len": 64,
    "micro_batch_size": 4,
}


class Tokenizers:
    def describe(self, ref: str) -> tok_pb.TokenizerInfo:
        if ref.partition(":")[0] not in TOKENIZERS:
            raise TokenizerNotFound()
        return TOKENIZERS[ref.partition(":")[0]]


@pytest.fixture
def context(tmp_path: Path) -> JobContext:
    from libs.common.artifacts import ArtifactStore

    artifacts = ArtifactStore(tmp_path)
    (artifacts.root / "corpora" / "topics").mkdir(parents=True)
    (artifacts.root / "corpora" / "topics" / "part-00000.txt").write_text("some text")
    return JobContext(
        store=None,  # type: ignore[arg-type]
        registry=TargetRegistry(tmp_path),  # type: ignore[arg-type]
        artifacts=artifacts,
        tokenizer=Tokenizers(),  # type: ignore[arg-type]
        redis_url="",
        worker_memory_bytes=1 * GB,
        ray_storage=str(tmp_path / "ray"),
    )


def test_valid_jobs_are_accepted_with_references_pinned(context: JobContext) -> None:
    assert job_type("mlm").check(MLM, context)["tokenizer"] == "wp:2"
    distill = job_type("distill").check({"target": "target", "model_name": "draft", "seq_len": 64}, context)
    assert (distill["target"], distill["tokenizer"], distill["corpus"]) == ("target:1", "bpe:1", ["topics"])
    assert job_type("sweep").check(SWEEP, context)["tokenizer"] == "bpe:1"


@pytest.mark.parametrize(
    ("kind", "config", "error", "field"),
    [
        ("mlm", {**MLM, "tokenizer": "bpe"}, InvalidArgument, "config.mask_token"),
        ("mlm", {**MLM, "mask_probability": 0}, InvalidArgument, "config.mask_probability"),
        ("mlm", {**MLM, "seq_len": 3}, InvalidArgument, "config.seq_len"),
        ("mlm", {**MLM, "hidden_size": 66}, InvalidArgument, "config.hidden_size"),
        ("distill", {"target": "nope", "model_name": "d"}, NotFound, "config.target"),
        ("distill", {"target": "target", "model_name": "d", "tokenizer": "wp"}, InvalidArgument, "config.tokenizer"),
        ("distill", {"target": "target", "model_name": "d", "seq_len": 256}, InvalidArgument, "config.seq_len"),
        (
            "distill",
            {"target": "target", "model_name": "d", "hard_label_weight": 2},
            InvalidArgument,
            "config.hard_label_weight",
        ),
        ("sweep", {**SWEEP, "sizes": SWEEP["sizes"][:2]}, InvalidArgument, "config.sizes"),
        ("sweep", {**SWEEP, "sizes": [*SWEEP["sizes"][:2], {"width": 3}]}, InvalidArgument, "config.sizes[2]"),
        ("sweep", {**SWEEP, "flops_budget": 1e6}, InvalidArgument, "config.flops_budget"),
        ("sweep", {**SWEEP, "max_steps": 5, "warmup_steps": 1}, InvalidArgument, "config.sizes[0]"),
        ("sweep", {**SWEEP, "tokens_per_param": -1}, InvalidArgument, "config.tokens_per_param"),
    ],
)
def test_bad_input_is_refused_naming_the_field(
    context: JobContext, kind: str, config: dict[str, Any], error: type[Exception], field: str
) -> None:
    with pytest.raises(error) as refused:
        job_type(kind).check(config, context)
    assert refused.value.field == field  # type: ignore[attr-defined]


def test_the_ladder_follows_the_tokens_per_parameter_rule() -> None:
    cfg = SweepConfig(**SWEEP)
    rungs = plan_ladder(cfg, 600)
    per_step = cfg.micro_batch_size * cfg.num_workers * cfg.seq_len
    assert [r.non_embedding for r in rungs] == sorted(r.non_embedding for r in rungs)
    for rung in rungs:
        assert rung.tokens == rung.steps * per_step
        assert rung.tokens >= 20 * rung.non_embedding > rung.tokens - per_step


def test_masking_follows_bert_recipe_and_is_reproducible() -> None:
    from transformers import BertConfig

    cfg = MaskedLMConfig(tokenizer="wp", corpus=["c"], model_name="m", seq_len=130, seed=1)
    ids = {"mask": 4, "cls": 2, "sep": 3}
    objective = MaskedLM(BertConfig(vocab_size=600), ids, [0, 1, 2, 3, 4], cfg)
    rows = torch.randint(5, 600, (400, 128))
    rows[:, 50] = 3  # a separator inside each row: never a target
    inputs, labels = objective.mask(rows, seed=7)
    chosen = labels != IGNORE
    assert inputs.shape == (400, 130) and (inputs[:, 0] == 2).all() and (inputs[:, -1] == 3).all()
    assert not chosen[:, [0, 51, 129]].any()
    assert chosen.float().mean().item() == pytest.approx(0.15 * 127 / 130, abs=0.01)
    masked = (inputs[chosen] == 4).float().mean().item()
    kept = (inputs[chosen] == labels[chosen]).float().mean().item()
    assert masked == pytest.approx(0.8, abs=0.02) and kept == pytest.approx(0.1 + 0.1 / 600, abs=0.02)
    again, _ = objective.mask(rows, seed=7)
    assert torch.equal(again, inputs) and not torch.equal(objective.mask(rows, seed=8)[0], inputs)


def test_the_distillation_divergence_is_zero_only_on_agreement() -> None:
    logits = torch.randn(2, 5, 30)
    assert kl_per_position(logits, logits).abs().max() < 1e-5
    other = kl_per_position(logits, torch.randn(2, 5, 30))
    assert other.shape == (2, 5) and (other > 0).all()
