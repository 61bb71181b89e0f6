"""The model registry: every model a job produces, versioned, with its lineage, metrics and files.

Metadata lives in Redis, the files in the artifact store:

    llmp:models:<name>        hash: version -> the model's record (JSON)
    llmp:models:<name>:next   the last version handed out (INCR, so versions never repeat)
    llmp:models:names         set of model names
    models/<name>/<version>/  config.json, model.safetensors, tokenizer.json, tokenizer_config.json, ...

A model folder loads with `transformers` (`AutoModelForCausalLM.from_pretrained(folder)`) and so
with the inference service. Models are addressed as "name", "name:latest" or "name:<version>".
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from libs.common.artifacts import ArtifactStore, check_name
from libs.common.errors import InvalidArgument, LlmpError, NotFound
from libs.common.planning import ModelShape
from services.training.jobstore import now, redis_unavailable

PREFIX = "llmp:models"
KIND = "models"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class Lineage:
    """Where a model came from."""

    job_id: str
    tokenizer: str
    parent: str = ""
    datasets: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelInfo:
    name: str
    version: int
    path: str
    lineage: Lineage
    metrics: dict[str, float] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    parameters: int = 0
    created_at: str = ""

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    @classmethod
    def from_json(cls, text: str) -> ModelInfo:
        data = json.loads(text)
        data["lineage"] = Lineage(**data["lineage"])
        return cls(**data)


def parse_ref(ref: str, field_name: str = "model") -> tuple[str, str]:
    """("name", "" | "latest" | "<version>") of a model reference, checked."""
    name, _, version = (ref or "").partition(":")
    check_name(name, field_name)
    if version not in ("", "latest") and not version.isdigit():
        raise InvalidArgument(f"{ref!r}: the version must be a number or 'latest'", field=field_name)
    return name, version


class ModelRegistry:
    def __init__(self, client: redis.Redis, artifacts: ArtifactStore) -> None:
        # Built with decode_responses=True, so replies are str, which redis-py's stubs cannot express.
        self.redis: Any = client
        self.artifacts = artifacts

    @redis_unavailable
    def register(
        self,
        name: str,
        model_dir: Path,
        tokenizer_dir: Path,
        lineage: Lineage,
        metrics: dict[str, float],
        parameters: int,
    ) -> ModelInfo:
        """Copy the model and its tokeniser into models/<name>/<version>/ and record it."""
        check_name(name, "model_name")
        version = int(self.redis.incr(f"{PREFIX}:{name}:next"))
        relative = f"{KIND}/{name}/{version}"
        with self.artifacts.staging(relative) as tmp:
            for source in sorted(model_dir.iterdir()):
                if source.is_file():
                    shutil.copy2(source, tmp / source.name)
            for file_name in TOKENIZER_FILES:
                if (tokenizer_dir / file_name).is_file():
                    shutil.copy2(tokenizer_dir / file_name, tmp / file_name)
            files = sorted(p.name for p in tmp.iterdir())
        info = ModelInfo(name, version, relative, lineage, metrics, files, parameters, now())
        try:
            pipe = self.redis.pipeline()
            pipe.hset(f"{PREFIX}:{name}", str(version), json.dumps(dataclasses.asdict(info)))
            pipe.sadd(f"{PREFIX}:names", name)
            pipe.execute()
        except redis.RedisError:
            self.artifacts.delete(relative)
            raise
        return info

    @redis_unavailable
    def get(self, ref: str) -> ModelInfo:
        name, version = parse_ref(ref)
        records = self.redis.hgetall(f"{PREFIX}:{name}")
        if not records:
            raise NotFound(f"no model named {name!r}", field="model")
        versions = sorted(int(v) for v in records)
        chosen = versions[-1] if version in ("", "latest") else int(version)
        if chosen not in versions:
            raise NotFound(f"{name!r} has no version {chosen} (versions: {versions})", field="model")
        return ModelInfo.from_json(records[str(chosen)])

    def path(self, ref: str) -> Path:
        """The folder of a model in the artifact store."""
        return self.artifacts.path(self.get(ref).path, field="model")

    @redis_unavailable
    def list(self, prefix: str = "") -> list[ModelInfo]:
        """Every version of every model whose name starts with `prefix`, by name then version."""
        out = []
        for name in sorted(n for n in self.redis.smembers(f"{PREFIX}:names") if n.startswith(prefix)):
            records = self.redis.hgetall(f"{PREFIX}:{name}")
            out += [ModelInfo.from_json(records[v]) for v in sorted(records, key=int)]
        return out


@dataclass(frozen=True)
class Registered:
    """A registered model as a job builds on it: its record, folder and Hugging Face config."""

    info: ModelInfo
    path: Path
    config: dict[str, Any]

    @property
    def shape(self) -> ModelShape:
        return ModelShape.from_hf_config(self.config)

    @property
    def corpora(self) -> list[str]:
        """The corpora it was trained on (its lineage's data sets, less the packed ones of its job)."""
        return [d for d in self.info.lineage.datasets if not d.startswith("datasets/")]


def registered(registry: ModelRegistry, ref: str, field_name: str, head: str = "ForCausalLM") -> Registered:
    """A model from the registry whose architecture ends with `head` (a causal LM, or a reward model)."""
    try:
        info = registry.get(ref)
        path = registry.path(info.ref)
    except LlmpError as e:
        raise type(e)(e.message, field=field_name) from None
    config_file = path / "config.json"
    if not config_file.is_file():
        raise InvalidArgument(f"{info.ref} is a LoRA adapter, not a full model; use its merged form", field=field_name)
    config = json.loads(config_file.read_text())
    if not any(a.endswith(head) for a in config.get("architectures", [])):
        raise InvalidArgument(
            f"{info.ref} is a {config.get('architectures')} model; expected a *{head} model", field=field_name
        )
    return Registered(info, path, config)
