from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from libs.common import config as cfg
from libs.common.config import CommonConfig, ServiceConfig, doc
from libs.common.errors import InvalidArgument
from libs.common.settings import VARIABLES
from services.tokenizer.config import TokenizerConfig


@dataclasses.dataclass
class DemoConfig(ServiceConfig):
    port: int = doc("port", 1234)
    ratio: float = doc("a ratio", 0.5)
    names: list[str] = doc("names", default_factory=list)
    enabled: bool = doc("switch", False)


def test_defaults_then_file_then_env_then_flags(tmp_path: Path) -> None:
    file = tmp_path / "llmp.yaml"
    file.write_text("demo:\n  port: 2000\n  ratio: 0.25\n  names: [a, b]\n")
    assert cfg.load(DemoConfig, "demo", environ={}).port == 1234
    from_file = cfg.load(DemoConfig, "demo", file=file, environ={})
    assert (from_file.port, from_file.ratio, from_file.names) == (2000, 0.25, ["a", "b"])
    env = {"LLMP_DEMO_PORT": "3000", "LLMP_DEMO_ENABLED": "true", "LLMP_DEMO_NAMES": "x,y"}
    from_env = cfg.load(DemoConfig, "demo", file=file, environ=env)
    assert (from_env.port, from_env.ratio, from_env.enabled, from_env.names) == (3000, 0.25, True, ["x", "y"])
    from_flags = cfg.load(DemoConfig, "demo", file=file, environ=env, flags={"port": 4000, "ratio": None})
    assert (from_flags.port, from_flags.ratio) == (4000, 0.25)


def test_config_file_from_environment(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("common:\n  log_level: DEBUG\n")
    assert cfg.load(CommonConfig, "common", environ={"LLMP_CONFIG": str(file)}).log_level == "DEBUG"


def test_bad_values_name_the_setting(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"demo\.port"):
        cfg.load(DemoConfig, "demo", environ={"LLMP_DEMO_PORT": "eighty"})
    with pytest.raises(InvalidArgument, match="unknown setting 'colour'"):
        cfg.load(DemoConfig, "demo", environ={}, flags={"colour": "red"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(InvalidArgument, match="mapping"):
        cfg.load(DemoConfig, "demo", file=bad, environ={})


@pytest.mark.parametrize(("cls", "section"), [(CommonConfig, "common"), (TokenizerConfig, "tokenizer")])
def test_every_variable_read_is_declared_once(cls: type, section: str) -> None:
    assert cfg.undeclared(cls, section) == []


def test_declared_defaults_match_the_dataclasses() -> None:
    declared = {name: VARIABLES[name].default for name in cfg.declared_env_names(TokenizerConfig, "tokenizer")}
    assert cfg.load(TokenizerConfig, "tokenizer", environ=declared) == TokenizerConfig()
