"""Submission checks of the alignment jobs (sft, reward, dpo, grpo) and their built-in data sets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from libs.common.corpora import instruction_pairs, preference_pairs
from libs.common.errors import InvalidArgument, NotFound
from libs.common.planning import GB
from services.training.jobs import JobContext, job_type, parse_config
from services.training.jobs.align import SFTJobConfig, check_record, split
from services.training.registry import Lineage, ModelInfo
from tests.unit.training.test_family_jobs import Registry as CausalRegistry

SFT = {"base": "target", "data": ["pydoc:instructions"], "model_name": "sft", "max_length": 128}
PREF = {"base": "target", "data": ["pydoc:preferences"], "model_name": "m", "max_length": 128}


class Registry(CausalRegistry):
    """A causal LM "target:1" and a reward model "rm:1" (LlamaForSequenceClassification), same tokeniser."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.rm = root / "models" / "rm" / "1"
        self.rm.mkdir(parents=True)
        config = json.loads((self.folder / "config.json").read_text())
        (self.rm / "config.json").write_text(
            json.dumps({**config, "architectures": ["LlamaForSequenceClassification"]})
        )

    def get(self, ref: str) -> ModelInfo:
        if ref.startswith("rm"):
            return ModelInfo("rm", 1, "models/rm/1", Lineage(job_id="rm-1", tokenizer="bpe:1"))
        return super().get(ref)

    def path(self, ref: str) -> Path:
        return self.rm if ref.startswith("rm") else self.folder


@pytest.fixture
def context(tmp_path: Path) -> JobContext:
    from libs.common.artifacts import ArtifactStore

    artifacts = ArtifactStore(tmp_path)
    data = artifacts.root / "corpora" / "mine"
    data.mkdir(parents=True)
    (data / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in instruction_pairs()[:20]))
    (artifacts.root / "bad.jsonl").write_text(
        '{"prompt": "p", "completion": "c"}\n\n{"prompt": "p", "completion": 3}\n'
    )
    (artifacts.root / "broken.jsonl").write_text('{"prompt": "p", "completion": "c"}\n{"prompt": \n')
    return JobContext(
        store=None,  # type: ignore[arg-type]
        registry=Registry(tmp_path),  # type: ignore[arg-type]
        artifacts=artifacts,
        tokenizer=None,  # type: ignore[arg-type]
        redis_url="",
        worker_memory_bytes=1 * GB,
        ray_storage=str(tmp_path / "ray"),
    )


def test_the_built_in_sets_come_from_the_reference_text() -> None:
    pairs, prefs = instruction_pairs(), preference_pairs()
    assert len(pairs) == len(prefs) > 500
    for pair, pref in zip(pairs, prefs, strict=True):
        assert pref["prompt"] == pair["prompt"] and pref["chosen"] == pair["completion"]
        assert sorted(pref["rejected"].split()) == sorted(pref["chosen"].split()) != pref["rejected"].split()
    assert preference_pairs() == prefs  # stable


def test_valid_jobs_are_accepted_with_references_pinned(context: JobContext) -> None:
    assert job_type("sft").check(SFT, context)["base"] == "target:1"
    assert job_type("sft").check({**SFT, "data": ["mine"], "lora_rank": 4}, context)["base"] == "target:1"
    assert job_type("reward").check(PREF, context)["base"] == "target:1"
    assert job_type("dpo").check({**PREF, "reference": "target:1"}, context)["reference"] == "target:1"
    grpo = job_type("grpo").check({**SFT, "reward_model": "rm", "max_completion_length": 32}, context)
    assert grpo["reward_model"] == "rm:1"


@pytest.mark.parametrize(
    ("kind", "config", "error", "field"),
    [
        ("sft", {**SFT, "base": "nope"}, NotFound, "config.base"),
        ("sft", {**SFT, "base": "rm"}, InvalidArgument, "config.base"),
        ("sft", {**SFT, "data": []}, InvalidArgument, "config.data"),
        ("sft", {**SFT, "data": ["missing"]}, NotFound, "config.data[0]"),
        ("sft", {**SFT, "data": ["mine", "bad.jsonl"]}, InvalidArgument, "config.data[1]"),
        ("sft", {**SFT, "data": ["broken.jsonl"]}, InvalidArgument, "config.data[0]"),
        ("sft", {**SFT, "data": ["pydoc:preferences"]}, InvalidArgument, "config.data[0]"),
        ("sft", {**SFT, "max_length": 129}, InvalidArgument, "config.max_length"),
        ("sft", {**SFT, "max_records": 2}, InvalidArgument, "config.data"),
        ("sft", {**SFT, "warmup_steps": 100}, InvalidArgument, "config.warmup_steps"),
        ("sft", {**SFT, "quantize": "nf4"}, InvalidArgument, "config.quantize"),
        ("sft", {**SFT, "quantize": "int3", "lora_rank": 4}, InvalidArgument, "config.quantize"),
        ("sft", {**SFT, "quantize": "nf4", "lora_rank": 4}, InvalidArgument, "config.quantize"),
        ("sft", {**SFT, "use_gpu": True}, InvalidArgument, "config.use_gpu"),
        ("sft", {**SFT, "micro_batch_size": 8192}, InvalidArgument, "config.micro_batch_size"),
        ("sft", {**SFT, "lora_alpha": 0}, InvalidArgument, "config.lora_alpha"),
        ("sft", {**SFT, "model_name": "no/slash"}, InvalidArgument, "config.model_name"),
        ("reward", {**PREF, "data": ["pydoc:instructions"]}, InvalidArgument, "config.data[0]"),
        ("dpo", {**PREF, "beta": 0}, InvalidArgument, "config.beta"),
        ("dpo", {**PREF, "reference": "rm"}, InvalidArgument, "config.reference"),
        ("grpo", {**SFT, "reward_model": "target"}, InvalidArgument, "config.reward_model"),
        ("grpo", {**SFT, "reward_model": "rm", "num_generations": 1}, InvalidArgument, "config.num_generations"),
        ("grpo", {**SFT, "reward_model": "rm", "num_generations": 3}, InvalidArgument, "config.num_generations"),
        ("grpo", {**SFT, "reward_model": "rm", "max_completion_length": 128}, InvalidArgument, "config.max_length"),
        ("grpo", {**SFT}, InvalidArgument, "config.reward_model"),
    ],
)
def test_bad_input_is_refused_naming_the_field(
    context: JobContext, kind: str, config: dict[str, Any], error: type[Exception], field: str
) -> None:
    with pytest.raises(error) as refused:
        job_type(kind).check(config, context)
    assert refused.value.field == field, refused.value  # type: ignore[attr-defined]


def test_a_bad_record_is_named_by_file_and_line(context: JobContext) -> None:
    with pytest.raises(InvalidArgument, match=r"bad.jsonl:3: 'completion' must be a non-empty string"):
        job_type("sft").check({**SFT, "data": ["bad.jsonl"]}, context)
    with pytest.raises(InvalidArgument, match=r"broken.jsonl:2: not JSON"):
        job_type("sft").check({**SFT, "data": ["broken.jsonl"]}, context)


@pytest.mark.parametrize(
    ("record", "kind", "message"),
    [
        ({"messages": []}, "instruction", "non-empty list"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "instruction", "role"),
        (
            {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},
            "instruction",
            "last",
        ),
        ({"prompt": "p", "chosen": "a", "rejected": "a"}, "preference", "the same"),
        ({"prompt": "p", "chosen": "a"}, "preference", "'rejected'"),
        ({"completion": "c"}, "prompt", "'prompt'"),
        (["not", "an", "object"], "prompt", "JSON object"),
    ],
)
def test_records_are_checked_per_job_kind(record: Any, kind: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        check_record(record, kind, "f.jsonl:1")
    check_record({"prompt": "", "chosen": "a", "rejected": "b"}, "preference", "ok")  # a preference prompt may be empty


def test_the_split_is_seeded_and_bounded() -> None:
    records = [{"prompt": str(i), "completion": "c"} for i in range(100)]
    cfg = parse_config(SFTJobConfig, {**SFT, "max_records": 50, "eval_fraction": 0.2, "max_eval_records": 6})
    train, heldout = split(records, cfg)
    assert (len(train), len(heldout)) == (44, 6) and not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    assert split(records, cfg) == (train, heldout)
    other = parse_config(SFTJobConfig, {**SFT, "max_records": 50, "seed": 1})
    assert split(records, other)[0] != train
