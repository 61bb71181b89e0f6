"""The plugin registry, including a third-party plugin installed as a real package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from libs.common.errors import InvalidArgument
from libs.common.plugins import Registry
from services.tokenizer.algorithms import ALGORITHMS, ByteLevelBPE

ROOT = Path(__file__).resolve().parents[3]
PLUGIN = ROOT / "tests" / "plugins" / "llmp-example-plugin"


def test_builtins_resolve_by_name() -> None:
    assert ALGORITHMS.get("byte_level_bpe") is ByteLevelBPE
    built = ALGORITHMS.create({"type": "wordpiece", "vocab_size": 100})
    assert built.vocab_size == 100
    assert {"bpe", "byte_level_bpe", "wordpiece", "unigram"} <= set(ALGORITHMS.names())


def test_unknown_name_and_bad_parameters_are_clear() -> None:
    with pytest.raises(InvalidArgument, match=r"unknown tokenizers plugin 'nope'; available: .*byte_level_bpe"):
        ALGORITHMS.get("nope")
    with pytest.raises(InvalidArgument, match=r"params: wordpiece takes no parameters \['colour'\]"):
        ALGORITHMS.create({"type": "wordpiece", "vocab_size": 10, "colour": "red"})
    with pytest.raises(InvalidArgument, match='"type"'):
        ALGORITHMS.create({"vocab_size": 10})


class Greedy:
    def __init__(self, temperature: float = 0.0) -> None:
        if temperature < 0:
            raise ValueError("temperature must be >= 0")
        self.temperature = temperature


def test_create_checks_parameters_against_the_signature() -> None:
    registry: Registry[Greedy] = Registry("samplers", {"greedy": f"{__name__}:Greedy"})
    assert registry.create({"type": "greedy", "temperature": 0.5}).temperature == 0.5
    assert registry.create("greedy").temperature == 0.0
    with pytest.raises(InvalidArgument, match="sampler: greedy does not take 'top_k'; it takes temperature"):
        registry.create({"type": "greedy", "top_k": 3}, field="sampler")
    with pytest.raises(InvalidArgument, match="sampler: greedy: temperature must be >= 0"):
        registry.create({"type": "greedy", "temperature": -1}, field="sampler")


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pip-install the example plugin package into a private folder."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(PLUGIN),
        ],
        check=True,
        capture_output=True,
    )
    return target


PROBE = """
import json
from libs.common.errors import InvalidArgument
from libs.common.plugins import Registry
from services.tokenizer.algorithms import ALGORITHMS, BPE
out = {"names": ALGORITHMS.names(), "bpe_is_builtin": ALGORITHMS.get("bpe") is BPE}
try:
    ALGORITHMS.get("broken")
except InvalidArgument as e:
    out["broken"] = str(e)
if "char_level" in out["names"]:
    algo = ALGORITHMS.create({"type": "char_level", "vocab_size": 100})
    tok = algo.pipeline()
    tok.train_from_iterator(["hello world", "lower newest"], algo.trainer())
    algo.finish(tok)
    out["tokens"] = tok.encode("hello").tokens
print(json.dumps(out))
"""


def probe(site: Path, code: str = PROBE, **env: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}", **env},
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_installed_plugin_is_found_and_works(installed_plugin: Path) -> None:
    out = probe(installed_plugin)
    assert "char_level" in out["names"]
    assert out["tokens"] == ["h", "e", "l", "l", "o"]
    assert out["bpe_is_builtin"], "a third-party plugin must never shadow a built-in"
    assert "failed to load" in out["broken"]


def test_allow_list_restricts_third_party_plugins(installed_plugin: Path) -> None:
    out = probe(installed_plugin, LLMP_PLUGINS_ALLOW="tokenizers:something_else")
    assert "char_level" not in out["names"]
    assert "byte_level_bpe" in out["names"], "built-ins are always available"
    assert "unknown tokenizers plugin 'broken'" in out["broken"]
    assert "char_level" in probe(installed_plugin, LLMP_PLUGINS_ALLOW="tokenizers:char_level")["names"]


KINDS_PROBE = """
import json, tempfile
from libs.common.artifacts import ArtifactStore
from services.inference.backends import ENGINES, make_backend
from services.inference.config import InferenceConfig
from services.inference.core import LocalBackend
from services.training.jobs import OBJECTIVES, job_type
from services.training.jobs.pretrain import PretrainJob
backend = make_backend(InferenceConfig(backend="in_process"), ArtifactStore(tempfile.mkdtemp()))
print(json.dumps({
    "job_types": OBJECTIVES.names(),
    "checked": job_type("instant").check({"steps": 1}, None),
    "pretrain_is_builtin": type(job_type("pretrain")) is PretrainJob,
    "engines": ENGINES.names(),
    "in_process_is_local": isinstance(backend, LocalBackend),
}))
"""


def test_installed_job_type_and_engine_are_found(installed_plugin: Path) -> None:
    out = probe(installed_plugin, KINDS_PROBE)
    assert {"instant", "pretrain", "sft", "ppo"} <= set(out["job_types"])
    assert out["checked"] == {"steps": 1, "checked_by": "instant"}
    assert out["pretrain_is_builtin"], "a third-party job type must never shadow a built-in"
    assert out["engines"] == ["in_process", "local", "ray"]
    assert out["in_process_is_local"]


def test_unknown_engine_names_the_setting(tmp_path: Path) -> None:
    from libs.common.artifacts import ArtifactStore
    from services.inference.backends import make_backend
    from services.inference.config import InferenceConfig

    with pytest.raises(InvalidArgument, match=r"unknown engines plugin 'tpu'; available: .*local") as refused:
        make_backend(InferenceConfig(backend="tpu"), ArtifactStore(tmp_path))
    assert refused.value.field == "inference.backend"
