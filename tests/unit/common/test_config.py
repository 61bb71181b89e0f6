from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from libs.common import config as cfg
from libs.common.config import CommonConfig, ServiceConfig, doc
from libs.common.errors import InvalidArgument
from libs.common.settings import SECTIONS, VARIABLES, configs


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


@pytest.mark.parametrize("section", list(SECTIONS))
def test_the_table_of_variables_reads_back_as_each_config(section: str) -> None:
    """Every field of every section has its variable in the table, with a doc, and the table's
    defaults, set as the environment, load as the dataclass's own defaults."""
    cls = configs()[section]
    names = [cfg.env_name(section, f.name) for f in dataclasses.fields(cls)]
    assert all(VARIABLES[name].doc for name in names)
    assert cfg.load(cls, section, environ={name: VARIABLES[name].default for name in names}) == cls()
    assert section == "common" or VARIABLES[cfg.env_name(section, "address")].default.endswith(f":{cls().port}")
