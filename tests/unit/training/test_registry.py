"""The model registry against a real redis-server and a temporary artifact store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from libs.common.artifacts import ArtifactStore
from libs.common.errors import InvalidArgument, NotFound
from services.training.registry import Lineage, ModelRegistry
from tests.helpers.redis_server import RedisServer


@pytest.fixture
def registry(redis_server: RedisServer, tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(redis.Redis.from_url(redis_server.url, decode_responses=True), ArtifactStore(tmp_path / "a"))


def _folders(tmp_path: Path) -> tuple[Path, Path]:
    model, tokenizer = tmp_path / "model", tmp_path / "tok"
    model.mkdir()
    tokenizer.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (model / "model.safetensors").write_bytes(b"weights")
    (tokenizer / "tokenizer.json").write_text("{}")
    (tokenizer / "tokenizer_config.json").write_text("{}")
    (tokenizer / "llmp.json").write_text("{}")
    return model, tokenizer


def test_versions_lineage_and_lookup(registry: ModelRegistry, tmp_path: Path) -> None:
    model, tokenizer = _folders(tmp_path)
    lineage = Lineage(job_id="train-1", tokenizer="tok:2", datasets=["topics"], config={"max_steps": 3})
    first = registry.register("tiny", model, tokenizer, lineage, {"eval_loss": 4.0}, 1234)
    second = registry.register("tiny", model, tokenizer, lineage, {"eval_loss": 3.0}, 1234)
    assert (first.ref, second.ref) == ("tiny:1", "tiny:2")
    assert first.files == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert registry.path("tiny:1") == registry.artifacts.root / "models" / "tiny" / "1"
    assert (registry.path("tiny:1") / "model.safetensors").read_bytes() == b"weights"
    assert registry.get("tiny").version == registry.get("tiny:latest").version == 2
    assert registry.get("tiny:1") == first and registry.get("tiny:1").lineage == lineage
    assert [m.ref for m in registry.list()] == ["tiny:1", "tiny:2"]
    assert registry.list("other") == []


def test_unknown_and_malformed_references_are_refused(registry: ModelRegistry, tmp_path: Path) -> None:
    model, tokenizer = _folders(tmp_path)
    registry.register("tiny", model, tokenizer, Lineage(job_id="j", tokenizer="t:1"), {}, 1)
    with pytest.raises(NotFound, match="model: no model named 'nope'"):
        registry.get("nope")
    with pytest.raises(NotFound, match="no version 7"):
        registry.get("tiny:7")
    with pytest.raises(InvalidArgument, match="model"):
        registry.get("tiny:first")
    with pytest.raises(InvalidArgument, match="model"):
        registry.get("../etc")
