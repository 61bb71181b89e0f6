"""Checks at submission of a pretraining job: every bad input is refused naming its field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from llmp.tokenizer.v1 import tokenizer_pb2 as tok_pb

from libs.common.artifacts import ArtifactStore
from libs.common.errors import InvalidArgument, NotFound
from libs.common.planning import GB
from services.training.jobs import JobContext, job_type
from services.training.jobs.pretrain import PretrainConfig
from tests.helpers.training import TokenizerNotFound

VALID = {"tokenizer": "tok", "corpus": ["topics"], "model_name": "tiny", "hidden_size": 64, "num_layers": 2}


class KnownTokenizers:
    """Stands in for the tokeniser service: it knows one tokeniser, "tok" (version 3)."""

    def describe(self, ref: str) -> tok_pb.TokenizerInfo:
        if ref.partition(":")[0] != "tok":
            raise TokenizerNotFound()
        return tok_pb.TokenizerInfo(
            name="tok",
            version=3,
            ref="tok:3",
            vocab_size=600,
            special_tokens=["<|endoftext|>"],
            path="tokenizers/tok/3",
        )


@pytest.fixture
def context(tmp_path: Path) -> JobContext:
    artifacts = ArtifactStore(tmp_path)
    (artifacts.root / "corpora" / "topics").mkdir(parents=True)
    (artifacts.root / "corpora" / "topics" / "part-00000.txt").write_text("some text")
    return JobContext(
        store=None,  # type: ignore[arg-type]
        registry=None,  # type: ignore[arg-type]
        artifacts=artifacts,
        tokenizer=KnownTokenizers(),  # type: ignore[arg-type]
        redis_url="",
        worker_memory_bytes=1 * GB,
        ray_storage=str(tmp_path / "ray"),
    )


def test_a_valid_job_is_accepted_with_its_tokenizer_pinned(context: JobContext) -> None:
    checked = job_type("pretrain").check(VALID, context)
    assert checked == {**VALID, "tokenizer": "tok:3"}
    config = PretrainConfig(**checked)
    assert config.mlp_size == 192  # 8/3 * 64 rounded up to a multiple of 64
    model = config.model_config(vocab_size=600, eos_id=0)
    assert (model.num_key_value_heads, model.rope_parameters["rope_theta"]) == (2, 10000.0)


@pytest.mark.parametrize(
    ("change", "error", "field"),
    [
        ({"learning_rate": 0}, InvalidArgument, "config.learning_rate"),
        ({"learning_rate": "fast"}, InvalidArgument, "config.learning_rate"),
        ({"max_steps": 2.5}, InvalidArgument, "config.max_steps"),
        ({"warmup_steps": 5000}, InvalidArgument, "config.warmup_steps"),
        ({"num_kv_heads": 3}, InvalidArgument, "config.num_kv_heads"),
        ({"hidden_size": 66}, InvalidArgument, "config.hidden_size"),
        ({"batch": 8}, InvalidArgument, "config.batch"),
        ({"model_name": "../x"}, InvalidArgument, "config.model_name"),
        ({"stages": [{"type": "shuffle"}]}, InvalidArgument, "config.stages[0].type"),
        ({"eos_token": "<pad>"}, InvalidArgument, "config.eos_token"),
        ({"tokenizer": "nope"}, NotFound, "config.tokenizer"),
        ({"corpus": ["nope"]}, NotFound, "config.corpus[0]"),
        ({"corpus": ["../../etc"]}, InvalidArgument, "config.corpus[0]"),
        ({"fsdp": True}, InvalidArgument, "config.fsdp"),
        ({"use_gpu": True}, InvalidArgument, "config.use_gpu"),
        (
            {"hidden_size": 4096, "num_layers": 32, "num_heads": 32, "num_kv_heads": 8},
            InvalidArgument,
            "config.micro_batch_size",
        ),
    ],
)
def test_bad_input_is_refused_naming_the_field(
    context: JobContext, change: dict[str, Any], error: type[Exception], field: str
) -> None:
    with pytest.raises(error) as refused:
        job_type("pretrain").check({**VALID, **change}, context)
    assert refused.value.field == field  # type: ignore[attr-defined]


def test_a_missing_setting_and_an_unknown_type_are_named() -> None:
    with pytest.raises(InvalidArgument) as refused:
        job_type("pretrain").check({"tokenizer": "tok", "corpus": ["c"]}, None)  # type: ignore[arg-type]
    assert refused.value.field == "config.model_name"
    with pytest.raises(InvalidArgument) as neither:
        job_type("pretrain").check({"tokenizer": "tok", "model_name": "m"}, None)  # type: ignore[arg-type]
    assert neither.value.field == "config.corpus" and "prepared dataset" in neither.value.message
    with pytest.raises(InvalidArgument) as unknown:
        job_type("finetune")
    assert unknown.value.field == "type"
