"""The secrets of $LLMP_HOME/secrets: created once, private, agreed on by racing processes."""

from __future__ import annotations

import multiprocessing
import os
import stat
from pathlib import Path

import pytest

from libs.common import secrets
from libs.common.config import CommonConfig
from libs.common.errors import FailedPrecondition


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_secret_is_made_once_and_kept_private(tmp_path: Path) -> None:
    assert secrets.read(tmp_path, secrets.RAY_TOKEN) is None
    token = secrets.ensure(tmp_path, secrets.RAY_TOKEN)
    assert len(token) == 64 and int(token, 16) >= 0
    assert secrets.ensure(tmp_path, secrets.RAY_TOKEN) == secrets.read(tmp_path, secrets.RAY_TOKEN) == token
    assert secrets.ensure(tmp_path, secrets.REDIS_PASSWORD) != token
    assert mode(tmp_path / "secrets") == 0o700
    assert mode(secrets.path(tmp_path, secrets.RAY_TOKEN)) == 0o600
    assert sorted(p.name for p in (tmp_path / "secrets").iterdir()) == ["ray.token", "redis.password"]


def test_a_given_generator_makes_the_value(tmp_path: Path) -> None:
    key = secrets.ensure(tmp_path, secrets.ADMIN_KEY, generate=lambda: "llmp-admin-" + secrets.new_secret())
    assert key.startswith("llmp-admin-") and secrets.read(tmp_path, secrets.ADMIN_KEY) == key


def _ensure_in_a_process(home: str) -> str:
    return secrets.ensure(Path(home), secrets.REDIS_PASSWORD)


def test_processes_starting_at_once_agree_on_one_value(tmp_path: Path) -> None:
    with multiprocessing.get_context("spawn").Pool(6) as pool:
        values = pool.map(_ensure_in_a_process, [str(tmp_path)] * 12)
    assert len(set(values)) == 1
    assert [p.name for p in (tmp_path / "secrets").iterdir()] == ["redis.password"], "no temporary file is left"


def test_a_secret_others_can_read_is_refused(tmp_path: Path) -> None:
    file = secrets.path(tmp_path, secrets.REDIS_PASSWORD)
    secrets.ensure(tmp_path, secrets.REDIS_PASSWORD)
    file.chmod(0o644)
    with pytest.raises(FailedPrecondition, match=r"open to other users .*chmod go-rwx"):
        secrets.read(tmp_path, secrets.REDIS_PASSWORD)
    file.chmod(0o600)
    (tmp_path / "secrets").chmod(0o755)
    with pytest.raises(FailedPrecondition, match="open to other users"):
        secrets.ensure(tmp_path, secrets.RAY_TOKEN)


def test_a_linked_secret_is_refused(tmp_path: Path) -> None:
    secrets.folder(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("planted")
    os.symlink(elsewhere, secrets.path(tmp_path, secrets.RAY_TOKEN))
    with pytest.raises(FailedPrecondition, match="symbolic link"):
        secrets.ensure(tmp_path, secrets.RAY_TOKEN)


def test_the_redis_url_carries_the_local_password_unless_one_is_given(tmp_path: Path) -> None:
    local = CommonConfig(home=str(tmp_path), redis_port=6390)
    assert secrets.redis_url(local) == "redis://127.0.0.1:6390/0"  # before `llmp up` made a password
    password = secrets.ensure(tmp_path, secrets.REDIS_PASSWORD)
    assert secrets.redis_url(local) == f"redis://:{password}@127.0.0.1:6390/0"
    assert secrets.redact(secrets.redis_url(local)) == "redis://:***@127.0.0.1:6390/0"
    given = CommonConfig(home=str(tmp_path), redis_url="redis://user:pw@redis:6379/1")
    assert secrets.redis_url(given) == "redis://user:pw@redis:6379/1"
    assert secrets.redact("redis://user:pw@redis:6379/1") == "redis://user:***@redis:6379/1"
    assert secrets.ray_env(tmp_path) == {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(tmp_path / "secrets" / "ray.token"),
    }


def test_config_show_never_prints_the_redis_password(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from libs.common.cli import cli

    monkeypatch.setenv("LLMP_REDIS_URL", "redis://:hunter2@redis:6379/0")
    shown = CliRunner().invoke(cli, ["config", "show"], terminal_width=240)
    assert shown.exit_code == 0, shown.output
    assert "hunter2" not in shown.output and "redis://:***@redis:6379/0" in shown.output


def test_a_redacted_url_takes_the_password_kept_in_llmp_home(tmp_path: Path) -> None:
    password = secrets.ensure(tmp_path, secrets.REDIS_PASSWORD)
    shown = secrets.redact(f"redis://:{password}@10.0.0.5:6379/0")
    assert password not in shown
    resolved = secrets.redis_url(CommonConfig(home=str(tmp_path), redis_url=shown))
    assert resolved == f"redis://:{password}@10.0.0.5:6379/0"
