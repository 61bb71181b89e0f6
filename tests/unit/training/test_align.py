"""Submission checks of the alignment jobs (sft, reward, dpo, grpo) and their built-in data sets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from libs.common.corpora import instruction_pairs
from libs.common.errors import InvalidArgument, NotFound
from libs.common.planning import GB
from services.training.jobs import JobContext, builtin_data, job_type, parse_config
from services.training.jobs.align import SFTJobConfig, check_record, split
from services.training.registry import Lineage, ModelInfo
from tests.helpers.training import TargetRegistry

SFT = {"base": "target", "data": ["pydoc:instructions"], "model_name": "sft", "max_length": 128}
PREF = {"base": "target", "data": ["pydoc:preferences"], "model_name": "m", "max_length": 128}


class Registry(TargetRegistry):
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


def test_pydoc_preferences_reject_a_continuation_from_another_topic() -> None:
    pairs, prefs = builtin_data.instruction_pairs(), builtin_data.pydoc_preferences()
    assert len(pairs) == len(prefs) > 500
    topics: dict[str, set[str]] = {}
    for p in pairs:
        topics.setdefault(p["completion"], set()).add(builtin_data.topic_of(p["prompt"]))
    for pair, pref in zip(pairs, prefs, strict=True):
        assert pref["prompt"] == pair["prompt"] and pref["chosen"] == pair["completion"]
        assert builtin_data.topic_of(pref["prompt"]) not in topics[pref["rejected"]]  # real text, another topic
    lengths = [len(p["rejected"]) / len(p["chosen"]) for p in prefs]
    assert sorted(lengths)[len(lengths) // 2] == pytest.approx(1.0, abs=0.1)  # length alone does not tell them apart
    assert builtin_data.pydoc_preferences() == prefs  # stable


def test_code_preferences_corrupt_one_thing_or_take_another_docstring() -> None:
    import ast

    prefs = builtin_data.code_preferences()
    bodies = [p for p in prefs if not p["chosen"].startswith('"""')]
    docstrings = [p for p in prefs if p["chosen"].startswith('"""')]
    assert len(bodies) > 200 and len(docstrings) > 200
    for pref in bodies:
        chosen, rejected = (ast.parse(pref["prompt"] + pref[k]) for k in ("chosen", "rejected"))
        old, new = ast.dump(chosen).split(), ast.dump(rejected).split()
        assert len(old) == len(new) and 1 <= sum(a != b for a, b in zip(old, new, strict=True)) <= 2  # one node
    for pref in docstrings:
        ast.parse(pref["prompt"])  # the function, without its docstring, is valid Python
        assert pref["chosen"] != pref["rejected"] and pref["rejected"].startswith('"""')


def test_the_held_out_split_is_whole_topics_the_same_in_every_set() -> None:
    for name in builtin_data.BUILTIN:
        records = builtin_data.builtin(name)
        held = [r for r in records if r["split"] == builtin_data.HELDOUT]
        assert 0.08 <= len(held) / len(records) <= 0.2, name
        groups = {s: {r["prompt"].split("\n", 1)[0] for r in records if r["split"] == s} for s in ("train", "heldout")}
        assert not groups["train"] & groups["heldout"]
    splits = {r["prompt"]: r["split"] for r in builtin_data.instruction_pairs()}
    assert all(splits[r["prompt"]] == r["split"] for r in builtin_data.pydoc_preferences())


def test_valid_jobs_are_accepted_with_references_pinned(context: JobContext) -> None:
    assert job_type("sft").check(SFT, context)["base"] == "target:1"
    assert job_type("sft").check({**SFT, "data": ["mine"], "lora_rank": 4}, context)["base"] == "target:1"
    assert job_type("reward").check(PREF, context)["base"] == "target:1"
    assert job_type("dpo").check({**PREF, "reference": "target:1"}, context)["reference"] == "target:1"
    grpo = job_type("grpo").check({**SFT, "reward_model": "rm", "max_completion_length": 32}, context)
    assert grpo["reward_model"] == "rm:1"
    assert (
        job_type("rloo").check({**SFT, "reward_model": "rm", "max_completion_length": 32}, context)["reward_model"]
        == "rm:1"
    )
    ppo = job_type("ppo").check({**SFT, "reward_model": "rm", "kl_target": 6.0}, context)
    assert (ppo["base"], ppo["reward_model"]) == ("target:1", "rm:1")


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
        ("rloo", {**SFT, "reward_model": "rm", "num_generations": 1}, InvalidArgument, "config.num_generations"),
        ("rloo", {**SFT, "reward_model": "target"}, InvalidArgument, "config.reward_model"),
        ("ppo", {**SFT}, InvalidArgument, "config.reward_model"),
        ("ppo", {**SFT, "reward_model": "target"}, InvalidArgument, "config.reward_model"),
        ("ppo", {**SFT, "reward_model": "rm", "lora_rank": 8}, InvalidArgument, "config.lora_rank"),
        ("ppo", {**SFT, "reward_model": "rm", "quantize": "nf4"}, InvalidArgument, "config.quantize"),
        ("ppo", {**SFT, "reward_model": "rm", "clip_range": -0.1}, InvalidArgument, "config.clip_range"),
        ("ppo", {**SFT, "reward_model": "rm", "gamma": 0}, InvalidArgument, "config.gamma"),
        ("ppo", {**SFT, "reward_model": "rm", "lam": 1.5}, InvalidArgument, "config.lam"),
        ("ppo", {**SFT, "reward_model": "rm", "ppo_epochs": 0}, InvalidArgument, "config.ppo_epochs"),
        ("ppo", {**SFT, "reward_model": "rm", "max_completion_length": 128}, InvalidArgument, "config.max_length"),
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


def test_records_tagged_heldout_are_the_held_out_split() -> None:
    records = [{"prompt": str(i), "completion": "c", "split": "heldout" if i % 4 == 0 else "train"} for i in range(100)]
    cfg = parse_config(SFTJobConfig, {**SFT, "max_eval_records": 20})
    train, heldout = split(records, cfg)
    assert len(heldout) == 20 and all(int(r["prompt"]) % 4 == 0 for r in heldout)
    assert len(train) == 75 and all(r["split"] == "train" for r in train)  # held-out beyond the cap are not trained on
    with pytest.raises(InvalidArgument, match="'split'"):
        check_record({"prompt": "p", "completion": "c", "split": "test"}, "instruction", "f.jsonl:1")


def test_the_split_is_seeded_and_bounded() -> None:
    records = [{"prompt": str(i), "completion": "c"} for i in range(100)]
    cfg = parse_config(SFTJobConfig, {**SFT, "max_records": 50, "eval_fraction": 0.2, "max_eval_records": 6})
    train, heldout = split(records, cfg)
    assert (len(train), len(heldout)) == (44, 6) and not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    assert split(records, cfg) == (train, heldout)
    other = parse_config(SFTJobConfig, {**SFT, "max_records": 50, "seed": 1})
    assert split(records, other)[0] != train
