"""The local stack's pieces that need no process: where Ray keeps its sockets, what Ray clients are told."""

from __future__ import annotations

import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from libs.common import secrets
from libs.common.config import CommonConfig
from libs.common.errors import FailedPrecondition
from libs.common.local_ray import (
    SERVE_CONTROL_LOOP_S,
    local_ray_env,
    make_ray_temp_dir,
    ray_temp_dir,
    remove_ray_temp_dir,
)
from libs.common.stack import LocalStack


def test_ray_temp_stays_under_llmp_home_unless_its_sockets_would_be_too_long(tmp_path: Path) -> None:
    short = Path("/tmp/h")
    assert ray_temp_dir(short) == short / "ray-session" / "t"
    deep = tmp_path / ("x" * 60)
    outside = ray_temp_dir(deep)
    assert not outside.is_relative_to(deep) and outside.parent.parent == Path("/tmp")
    assert outside == ray_temp_dir(deep), "the same LLMP_HOME always gets the same folder"
    assert ray_temp_dir(tmp_path / ("y" * 60)) != outside
    # Ray's longest socket path below the temp folder must fit a unix socket's 107 characters
    socket = f"{outside}/session_2026-12-01_15-00-09_889912_4194304/sockets/plasma_store"
    assert len(socket) <= 107
    made = make_ray_temp_dir(deep)
    made.chmod(0o777)  # as Ray leaves it: its private parent still keeps others out
    assert make_ray_temp_dir(deep) == made and stat.S_IMODE(made.parent.stat().st_mode) == 0o700
    remove_ray_temp_dir(deep)
    assert not made.parent.exists()
    short_home = Path(tempfile.mkdtemp(prefix="h", dir="/tmp"))  # short enough to hold Ray's sockets
    try:
        inside = make_ray_temp_dir(short_home)
        assert inside.is_relative_to(short_home)
        remove_ray_temp_dir(short_home)
        assert inside.exists(), "one under LLMP_HOME is kept, with Ray's logs"
    finally:
        shutil.rmtree(short_home)


def test_ray_clients_get_the_token_file_and_loopback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", raising=False)
    env = local_ray_env(tmp_path)
    token = secrets.path(tmp_path, secrets.RAY_TOKEN)
    assert env == {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": SERVE_CONTROL_LOOP_S,
    }
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text().strip()) == 64
    monkeypatch.setenv("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.2")
    assert local_ray_env(tmp_path)["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.2", "an operator's own value is kept"


def test_services_are_given_the_password_in_the_redis_url(tmp_path: Path) -> None:
    stack = LocalStack(CommonConfig(home=str(tmp_path), redis_port=6391))
    password = secrets.ensure(tmp_path, secrets.REDIS_PASSWORD)
    env = stack._service_env()
    assert env["LLMP_REDIS_URL"] == f"redis://:{password}@127.0.0.1:6391/0"
    assert env["LLMP_HOME"] == str(tmp_path) and "RAY_ADDRESS" not in env  # no Ray of ours is running


def test_a_ray_temp_folder_others_can_enter_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "llmp"
    private = make_ray_temp_dir(home).parent
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    private.chmod(0o777)  # as a folder another user planted in /tmp would be
    try:
        with pytest.raises(FailedPrecondition, match="not a private folder"):
            make_ray_temp_dir(home)
    finally:
        remove_ray_temp_dir(home)
