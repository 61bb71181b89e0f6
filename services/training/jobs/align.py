"""Alignment jobs with `trl` on Ray Train: SFT, a reward model, DPO, GRPO and RLOO (RLHF against the reward model).

    corpus -> pretrain -> sft -> reward (on preference pairs)
                              -> grpo, rloo (the SFT model against the reward model, KL-penalised to the SFT model)
                              -> ppo  (the same with PPO and a value head: jobs/ppo.py)
                              -> dpo  (the SFT model on preference pairs, itself the reference)

A job config, as submitted (`base`, `data` and `model_name` are required; GRPO and RLOO also `reward_model`):

    {"base": "tiny-code:latest", "data": ["pydoc:instructions"], "model_name": "tiny-sft",
     "max_steps": 200, "learning_rate": 1e-4, "lora_rank": 8, "merge_adapter": true}

`base` is a registered model (its tokeniser comes with it). `data` names JSON-lines files in the
artifact store (a corpus name from UploadCorpus, or a path relative to the store; a folder means
every *.jsonl in it) or the built-in sets (jobs/builtin_data.py): "pydoc:instructions" (prompt ->
completion), "pydoc:preferences" and "code:preferences" (prompt, chosen, rejected). Records:

    sft:    {"prompt": str, "completion": str}  or  {"messages": [{"role": ..., "content": ...}, ...]}
    reward, dpo: {"prompt": str, "chosen": str, "rejected": str}
    grpo, rloo, ppo: {"prompt": str, ...}  (other fields are ignored)

Chat messages need a tokeniser with a chat template. Every record is checked at submission; the
first bad one is refused with its file and line. A record may carry `"split": "train" | "heldout"`
(the built-in sets do, by topic); the held-out records (at most `max_eval_records`) give the
metrics. Data without the tag have a seeded share (`eval_fraction`) held out instead.

LoRA: `lora_rank` > 0 trains a peft adapter on every linear layer (or `lora_targets`) instead of
the full model; `merge_adapter` folds it into the base weights for the registered model, else the
adapter alone is registered (the inference service serves it with LoadAdapter on its base).
QLoRA (`quantize: "nf4"`) loads the frozen base in 4-bit NF4 through bitsandbytes, which needs
GPU workers (`use_gpu`, and the service's `worker_gpus`); it is refused otherwise.

Registered models carry their lineage: the base as parent, the data, the job and its config.
"""

from __future__ import annotations

import importlib.util
import json
import random
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from libs.common.artifacts import check_name
from libs.common.errors import InvalidArgument, NotFound
from libs.common.planning import ModelShape, TrainingMemory, training_memory
from services.training.dataprep.stage import require
from services.training.jobs import JobContext, parse_config
from services.training.jobs.builtin_data import BUILTIN, HELDOUT, TRAIN, builtin
from services.training.jobs.data import DATASETS
from services.training.jobs.hf_loop import HFLoop, TrainerSpec
from services.training.jobs.registration import NewModel, register
from services.training.jobs.resources import check_gpu, check_memory
from services.training.jobstore import JobRecord
from services.training.registry import Registered, registered

ROLES = ("system", "user", "assistant")
QUANTIZE = ("", "nf4")
BYTES_FP32 = 4


@dataclass(kw_only=True)
class AlignConfig(HFLoop):
    """Settings every alignment job shares: the trainer's (HFLoop) and these."""

    base: str
    """The registered model to start from ("name", "name:latest" or "name:<version>")."""
    data: list[str]
    """JSON-lines files or folders in the store, corpus names, or built-in sets ("pydoc:instructions", ...)."""
    model_name: str
    """Name under which the result is registered."""
    max_length: int = 256
    """Tokens per example (prompt and answer); longer ones are truncated."""
    max_records: int = 0
    """Use at most this many records (after a seeded shuffle); 0: all."""
    max_eval_records: int = 64
    lora_rank: int = 0
    """0: train every weight; > 0: a LoRA adapter of this rank."""
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=list)
    """Module names the adapter wraps; []: every linear layer but the output head."""
    merge_adapter: bool = True
    """Register the base with the adapter merged in; false: the adapter alone."""
    quantize: str = ""
    """"nf4": QLoRA (4-bit NF4 base through bitsandbytes; GPU workers and lora_rank > 0 required)."""

    def __post_init__(self) -> None:
        check_name(self.model_name, "model_name")
        require(bool(self.data), "give at least one data set", "data")
        self.check_loop()
        for name in ("max_length", "max_eval_records"):
            require(getattr(self, name) >= 1, "must be >= 1", name)
        require(self.max_records >= 0, "must be >= 0 (0: all)", "max_records")
        require(self.lora_rank >= 0, "must be >= 0 (0: full fine-tuning)", "lora_rank")
        require(self.lora_alpha > 0, "must be > 0", "lora_alpha")
        require(0 <= self.lora_dropout < 1, "must be in [0, 1)", "lora_dropout")
        require(self.quantize in QUANTIZE, f"must be one of {QUANTIZE}", "quantize")
        require(not self.quantize or self.lora_rank > 0, "QLoRA trains an adapter: set lora_rank > 0", "quantize")

    def loop(self) -> HFLoop:
        return HFLoop(**{f.name: getattr(self, f.name) for f in fields(HFLoop)})

    def lora(self) -> dict[str, Any] | None:
        """peft.LoraConfig settings, or None for full fine-tuning."""
        if not self.lora_rank:
            return None
        return {
            "r": self.lora_rank,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": self.lora_targets or "all-linear",
        }


@dataclass(kw_only=True)
class SFTJobConfig(AlignConfig):
    completion_only: bool = True
    """Prompt/completion records: learn only the completion's tokens (the prompt is context)."""
    packing: bool = False
    """Pack several examples into each row of max_length tokens (no padding; each attends only to itself)."""
    learning_rate: float = 1e-4


@dataclass(kw_only=True)
class RewardJobConfig(AlignConfig):
    center_rewards: float = 0.01
    """Weight of a penalty on the rewards' mean, so scores stay centred on 0."""
    learning_rate: float = 5e-5


@dataclass(kw_only=True)
class DPOJobConfig(AlignConfig):
    beta: float = 0.1
    """Strength of the pull towards the reference (the base): the implicit reward is beta * log-ratio."""
    reference: str = ""
    """"": the base; else another registered model with the same tokeniser."""
    learning_rate: float = 5e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.beta > 0, "must be > 0", "beta")


@dataclass(kw_only=True)
class GRPOJobConfig(AlignConfig):
    reward_model: str
    """A registered reward model (from a `reward` job) that scores prompt + completion."""
    beta: float = 0.04
    """Weight of the KL penalty to the reference (the base)."""
    num_generations: int = 4
    """Completions sampled per prompt; their rewards are compared within the group."""
    max_completion_length: int = 64
    temperature: float = 1.0
    learning_rate: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.beta >= 0, "must be >= 0", "beta")
        require(self.num_generations >= 2, "must be >= 2 (rewards are compared within a group)", "num_generations")
        require(self.max_completion_length >= 1, "must be >= 1", "max_completion_length")
        require(self.temperature > 0, "must be > 0", "temperature")
        require(
            self.max_completion_length < self.max_length, "must be < max_length (room for the prompt)", "max_length"
        )


@dataclass(kw_only=True)
class RLOOJobConfig(GRPOJobConfig):
    """GRPO's settings; the advantage is the reward less the mean of the group's other completions."""

    beta: float = 0.05


# -- data ---------------------------------------------------------------------------------------


def data_files(context: JobContext, ref: str, index: int) -> list[Path]:
    field_name = f"config.data[{index}]"
    named = context.artifacts.path(f"corpora/{ref}", field=field_name)
    path = named if named.is_dir() else context.artifacts.path(ref, field=field_name)
    if not path.exists():
        raise NotFound(
            f"no data set {ref!r} in the artifact store (nor a built-in: {sorted(BUILTIN)})", field=field_name
        )
    files = sorted(path.rglob("*.jsonl")) if path.is_dir() else [path]
    if not files:
        raise InvalidArgument(f"{ref!r} holds no .jsonl file", field=field_name)
    return files


def _text(record: dict[str, Any], key: str, where: str, empty_ok: bool = False) -> None:
    value = record.get(key)
    if not isinstance(value, str) or (not value.strip() and not empty_ok):
        raise InvalidArgument(f"{where}: {key!r} must be a non-empty string")


def check_record(record: Any, kind: str, where: str) -> None:
    """Refuse a record that does not have the fields the job type learns from."""
    if not isinstance(record, dict):
        raise InvalidArgument(f"{where}: a record must be a JSON object")
    if record.get("split", TRAIN) not in (TRAIN, HELDOUT):
        raise InvalidArgument(f"{where}: 'split' must be {TRAIN!r} or {HELDOUT!r}")
    if kind == "instruction":
        if "messages" in record:
            messages = record["messages"]
            if not isinstance(messages, list) or not messages:
                raise InvalidArgument(f"{where}: 'messages' must be a non-empty list")
            for m in messages:
                if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                    raise InvalidArgument(f"{where}: each message needs a role in {ROLES} and a string content")
            if messages[-1]["role"] != "assistant":
                raise InvalidArgument(f"{where}: the last message must be the assistant's answer")
            return
        _text(record, "prompt", where)
        _text(record, "completion", where)
    elif kind == "preference":
        _text(record, "prompt", where, empty_ok=True)
        _text(record, "chosen", where)
        _text(record, "rejected", where)
        if record["chosen"] == record["rejected"]:
            raise InvalidArgument(f"{where}: 'chosen' and 'rejected' are the same")
    else:
        _text(record, "prompt", where)


def load_records(context: JobContext, refs: list[str], kind: str) -> list[dict[str, Any]]:
    """Every record of the data sets, checked (the first bad one is refused with its place)."""
    records: list[dict[str, Any]] = []
    for i, ref in enumerate(refs):
        field_name = f"config.data[{i}]"
        if ref in BUILTIN:
            built = builtin(ref)
            for n, record in enumerate(built):
                try:
                    check_record(record, kind, f"{ref} record {n + 1}")
                except InvalidArgument as e:
                    raise InvalidArgument(e.message, field=field_name) from None
            records += built
            continue
        for path in data_files(context, ref, i):
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError as e:
                raise InvalidArgument(
                    f"{context.artifacts.relative(path)} is not UTF-8 ({e.reason})", field=field_name
                ) from None
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                where = f"{context.artifacts.relative(path)}:{n}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InvalidArgument(f"{where}: not JSON ({e.msg})", field=field_name) from None
                try:
                    check_record(record, kind, where)
                except InvalidArgument as e:
                    raise InvalidArgument(e.message, field=field_name) from None
                records.append(record)
    return records


def split(records: list[dict[str, Any]], cfg: AlignConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A seeded shuffle, cut to max_records, then (train, held-out): the records tagged "heldout" if
    any are (at most max_eval_records of them; the others are not trained on), else a share of them."""
    order = records[:]
    random.Random(cfg.seed).shuffle(order)
    if cfg.max_records:
        order = order[: cfg.max_records]
    tagged = [r for r in order if r.get("split") == HELDOUT]
    if tagged:
        return [r for r in order if r.get("split") != HELDOUT], tagged[: cfg.max_eval_records]
    held = min(cfg.max_eval_records, max(1, round(len(order) * cfg.eval_fraction)))
    return order[held:], order[:held]


def check_split(records: list[dict[str, Any]], cfg: AlignConfig) -> None:
    train, _ = split(records, cfg)
    if len(train) < 2:
        raise InvalidArgument(f"the data give {len(train)} training records; need at least 2", field="config.data")


def write_data(job: JobRecord, context: JobContext, records: list[dict[str, Any]], cfg: AlignConfig) -> Path:
    """train.jsonl and eval.jsonl under datasets/<job_id>/ (a resumed job reuses them)."""
    out = context.artifacts.path(f"{DATASETS}/{job.job_id}")
    if (out / "eval.jsonl").is_file():
        return out
    train, heldout = split(records, cfg)
    with context.artifacts.staging(f"{DATASETS}/{job.job_id}") as tmp:
        for name, rows in (("train", train), ("eval", heldout)):
            untagged = ({k: v for k, v in r.items() if k != "split"} for r in rows)
            (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in untagged))
    context.store.log(job.job_id, f"data: {len(train)} training records, {len(heldout)} held out")
    return out


# -- checks shared by the job types -------------------------------------------------------------


def check_hardware(cfg: AlignConfig, context: JobContext) -> None:
    check_gpu(cfg.use_gpu, context)
    if cfg.quantize:
        if not cfg.use_gpu:
            raise InvalidArgument(
                "QLoRA (4-bit NF4 through bitsandbytes) needs GPU workers: set use_gpu", field="config.quantize"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise InvalidArgument("QLoRA needs the bitsandbytes package on the workers", field="config.quantize")


def check_chat(records: list[dict[str, Any]], base: Registered) -> None:
    chats = sum("messages" in r for r in records)
    if not chats:
        return
    if chats < len(records):
        raise InvalidArgument(
            "the data mix chat messages and prompt/completion records; use one form", field="config.data"
        )
    tokenizer_config = base.path / "tokenizer_config.json"
    template = json.loads(tokenizer_config.read_text()).get("chat_template") if tokenizer_config.is_file() else None
    if not template:
        raise InvalidArgument(
            f"the data have chat messages but {base.info.ref}'s tokeniser has no chat template; train the tokeniser "
            "with one (chat_template) or give prompt/completion records",
            field="config.data",
        )


def memory_need(cfg: AlignConfig, shape: ModelShape, sequences: int) -> TrainingMemory:
    """Per-worker memory of the trained model: all of it, or a frozen base (fp32 or NF4) under an adapter."""
    full = training_memory(shape, sequences, cfg.max_length, precision="fp32")
    if not cfg.lora_rank:
        return full
    weight_bytes = 0.5 if cfg.quantize else BYTES_FP32
    return TrainingMemory(int(shape.param_count() * weight_bytes), 0, 0, 0, full.activations)


def new_model(
    job: JobRecord, context: JobContext, cfg: AlignConfig, base: Registered, dataset: Path, parents: tuple[str, ...]
) -> NewModel:
    """What the trained model is registered as: a child of the base, with its tokeniser."""
    return NewModel(
        name=cfg.model_name,
        tokenizer=base.info.lineage.tokenizer,
        tokenizer_files=base.path,
        datasets=[*cfg.data, *parents, context.artifacts.relative(dataset)],
        parameters=base.shape.param_count(),
        parent=base.info.ref,
    )


class AlignJob:
    """What the four job types share: checks at submission, then data, training and registration."""

    config_class: type[AlignConfig] = AlignConfig
    data_kind = "instruction"
    head = "ForCausalLM"
    sequences_per_example = 1
    """Sequences one example puts through the model (2 for a preference pair)."""

    def models(self, cfg: Any, context: JobContext) -> tuple[Registered, dict[str, Any], int]:
        """The base, the config references pinned to versions, and bytes of frozen helper models per worker."""
        base = registered(context.registry, cfg.base, "config.base")
        return base, {"base": base.info.ref}, 0

    def check(self, config: dict[str, Any], context: JobContext) -> dict[str, Any]:
        cfg = parse_config(self.config_class, config)
        check_hardware(cfg, context)
        base, pinned, helpers = self.models(cfg, context)
        positions = int(base.config.get("max_position_embeddings") or cfg.max_length)
        require(cfg.max_length <= positions, f"must be <= the base's context ({positions})", "config.max_length")
        records = load_records(context, cfg.data, self.data_kind)
        check_chat(records, base)
        check_split(records, cfg)
        need = memory_need(cfg, base.shape, cfg.micro_batch_size * self.sequences_per_example)
        check_memory(context, need, helpers, "the base model")
        return {**config, **pinned}

    def spec(self, cfg: Any, base: Registered, context: JobContext) -> TrainerSpec:
        raise NotImplementedError

    def fit(
        self, job: JobRecord, context: JobContext, cfg: Any, base: Registered, dataset: Path
    ) -> dict[str, float] | None:
        """Train on the job's Ray Train workers; the final metrics, or None if it stopped early."""
        from services.training.jobs import hf_loop

        return hf_loop.fit(job, context, dataset, self.spec(cfg, base, context), cfg.loop())

    def run(self, job: JobRecord, context: JobContext) -> str:
        cfg = parse_config(self.config_class, job.config)
        base, _, _ = self.models(cfg, context)
        stop = context.store.stop_requested(job.job_id)
        if stop:
            return stop
        dataset = write_data(job, context, load_records(context, cfg.data, self.data_kind), cfg)
        metrics = self.fit(job, context, cfg, base, dataset)
        return register(job, context, metrics, new_model(job, context, cfg, base, dataset, self.parents(cfg)))

    def parents(self, cfg: Any) -> tuple[str, ...]:
        return ()


class SFTJob(AlignJob):
    config_class = SFTJobConfig

    def spec(self, cfg: SFTJobConfig, base: Registered, context: JobContext) -> TrainerSpec:
        from services.training.jobs.trl_specs import SFTSpec

        return SFTSpec(
            str(base.path),
            cfg.lora(),
            cfg.merge_adapter,
            cfg.quantize,
            cfg.max_length,
            cfg.completion_only,
            cfg.packing,
        )


class RewardJob(AlignJob):
    config_class = RewardJobConfig
    data_kind = "preference"
    sequences_per_example = 2

    def spec(self, cfg: RewardJobConfig, base: Registered, context: JobContext) -> TrainerSpec:
        from services.training.jobs.trl_specs import RewardSpec

        return RewardSpec(
            str(base.path), cfg.lora(), cfg.merge_adapter, cfg.quantize, cfg.max_length, cfg.center_rewards
        )


class DPOJob(AlignJob):
    config_class = DPOJobConfig
    data_kind = "preference"
    sequences_per_example = 2

    def models(self, cfg: DPOJobConfig, context: JobContext) -> tuple[Registered, dict[str, Any], int]:
        base, pinned, _ = super().models(cfg, context)
        if not cfg.reference:
            frozen = 0 if cfg.lora_rank else base.shape.param_count() * BYTES_FP32  # LoRA: the base is the reference
            return base, pinned, frozen
        reference = registered(context.registry, cfg.reference, "config.reference")
        same_tokenizer(base, reference, "config.reference")
        return base, {**pinned, "reference": reference.info.ref}, reference.shape.param_count() * BYTES_FP32

    def spec(self, cfg: DPOJobConfig, base: Registered, context: JobContext) -> TrainerSpec:
        from services.training.jobs.trl_specs import DPOSpec

        reference = str(registered(context.registry, cfg.reference, "config.reference").path) if cfg.reference else ""
        return DPOSpec(str(base.path), cfg.lora(), cfg.merge_adapter, cfg.quantize, cfg.max_length, cfg.beta, reference)

    def parents(self, cfg: DPOJobConfig) -> tuple[str, ...]:
        return (cfg.reference,) if cfg.reference else ()


class GRPOJob(AlignJob):
    config_class = GRPOJobConfig
    data_kind = "prompt"
    spec_class = "GRPOSpec"

    def models(self, cfg: GRPOJobConfig, context: JobContext) -> tuple[Registered, dict[str, Any], int]:
        base, pinned, _ = super().models(cfg, context)
        reward = registered(context.registry, cfg.reward_model, "config.reward_model", head="ForSequenceClassification")
        same_tokenizer(base, reward, "config.reward_model")
        frozen = reward.shape.param_count() * BYTES_FP32
        if cfg.beta > 0 and not cfg.lora_rank:
            frozen += base.shape.param_count() * BYTES_FP32  # the reference copy
        return base, {**pinned, "reward_model": reward.info.ref}, frozen

    def check(self, config: dict[str, Any], context: JobContext) -> dict[str, Any]:
        pinned = super().check(config, context)
        cfg = parse_config(GRPOJobConfig, config)
        batch = cfg.micro_batch_size * cfg.grad_accum_steps * cfg.num_workers
        if batch % cfg.num_generations:
            raise InvalidArgument(
                f"completions per step (micro_batch_size x grad_accum_steps x num_workers = {batch}) must be a "
                f"multiple of num_generations ({cfg.num_generations})",
                field="config.num_generations",
            )
        return pinned

    def spec(self, cfg: GRPOJobConfig, base: Registered, context: JobContext) -> TrainerSpec:
        from services.training.jobs import trl_specs

        reward = registered(context.registry, cfg.reward_model, "config.reward_model", head="ForSequenceClassification")
        spec: type[trl_specs.GRPOSpec] = getattr(trl_specs, self.spec_class)
        return spec(
            str(base.path),
            cfg.lora(),
            cfg.merge_adapter,
            cfg.quantize,
            cfg.max_length,
            str(reward.path),
            cfg.beta,
            cfg.num_generations,
            cfg.max_completion_length,
            cfg.temperature,
        )

    def parents(self, cfg: GRPOJobConfig) -> tuple[str, ...]:
        return (cfg.reward_model,)


class RLOOJob(GRPOJob):
    config_class = RLOOJobConfig
    spec_class = "RLOOSpec"


def same_tokenizer(base: Registered, other: Registered, field_name: str) -> None:
    if other.info.lineage.tokenizer != base.info.lineage.tokenizer:
        raise InvalidArgument(
            f"{other.info.ref} uses tokenizer {other.info.lineage.tokenizer}, {base.info.ref} uses "
            f"{base.info.lineage.tokenizer}: they must share one",
            field=field_name,
        )
