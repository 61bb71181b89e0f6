"""`llmp up` as a new user on a fresh machine: an empty HOME (no ~/.ray) and an empty LLMP_HOME.

The whole stack comes up SERVING with the secrets it generated itself; Ray refuses a job
submitted without the token and Redis a command without the password; every listener is on
loopback; `llmp down` leaves no process and no open port behind. A taken port is one line
naming the variable to change.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis

from libs.common import secrets
from libs.common.local_ray import ray_temp_dir
from libs.common.ports import free_port
from libs.common.stack import installed_services
from tests.helpers.services import ROOT

pytestmark = pytest.mark.e2e

LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
UP_TIMEOUT_S = 600  # Ray and every service on a small, busy machine


def run_llmp(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from libs.common.cli import main; main()", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def fresh_env(tmp_path: Path) -> dict[str, str]:
    """A new user's environment: empty HOME and LLMP_HOME, nothing of ours or Ray's inherited, free ports."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMP_", "RAY_"))}
    env |= {"HOME": str(home), "LLMP_HOME": str(tmp_path / "llmp"), "LLMP_LOG_FORMAT": "text", "COLUMNS": "200"}
    for name in ("LLMP_REDIS_PORT", "LLMP_RAY_PORT", "LLMP_RAY_DASHBOARD_PORT", "LLMP_GATEWAY_HTTP_PORT"):
        env[name] = str(free_port())
    for spec in installed_services():
        env[f"LLMP_{spec.name.upper()}_PORT"] = str(free_port())
        env[f"LLMP_{spec.name.upper()}_METRICS_PORT"] = str(free_port())
    return env


@pytest.fixture
def taken() -> Iterator[int]:
    """A port something else listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_a_service_on_a_taken_port_says_so_in_one_line(tmp_path: Path, taken: int) -> None:
    env = fresh_env(tmp_path)
    for flag, variable in (("--port", "LLMP_TOKENIZER_PORT"), ("--metrics-port", "LLMP_TOKENIZER_METRICS_PORT")):
        other = "--metrics-port" if flag == "--port" else "--port"
        result = subprocess.run(
            [sys.executable, "-m", "services.tokenizer", flag, str(taken), other, str(free_port())],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode != 0
        assert "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1] == f"port {taken} is in use: set {variable}"


def test_llmp_up_on_a_taken_port_says_so_in_one_line(tmp_path: Path, taken: int) -> None:
    env = fresh_env(tmp_path) | {"LLMP_REDIS_PORT": str(taken)}
    result = run_llmp(env, "up", "--only", "tokenizer")
    assert result.returncode == 2
    assert result.stdout.strip() == f"error: port {taken} is in use: set LLMP_REDIS_PORT"

    second = tmp_path / "second"
    second.mkdir()
    env = fresh_env(second) | {"LLMP_TOKENIZER_PORT": str(taken)}
    try:
        result = run_llmp(env, "up", "--only", "tokenizer")
    finally:
        assert run_llmp(env, "down").returncode == 0
    assert result.returncode == 2
    line = " ".join(result.stdout.split())  # rich wraps long lines
    assert f"error: tokenizer stopped: port {taken} is in use: set LLMP_TOKENIZER_PORT" in line
    assert "Traceback" not in result.stdout + result.stderr


def stack_processes(llmp_home: Path) -> list[psutil.Process]:
    """Every process the stack started (its pid files) and everything those started."""
    found: dict[int, psutil.Process] = {}
    for pidfile in (llmp_home / "run").glob("*.json"):
        try:
            top = psutil.Process(json.loads(pidfile.read_text())["pid"])
        except psutil.NoSuchProcess:
            continue
        for proc in [top, *top.children(recursive=True)]:
            found[proc.pid] = proc
    return list(found.values())


def listening(processes: list[psutil.Process]) -> set[tuple[str, int]]:
    out = set()
    for proc in processes:
        try:
            out |= {(c.laddr.ip, c.laddr.port) for c in proc.net_connections("inet") if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:
            continue
    return out


def refused(url: str, data: bytes | None = None, token: str | None = None) -> int:
    """The HTTP status of a request to Ray's dashboard (200 when it is served)."""
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=30) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow
def test_a_fresh_machine_runs_the_whole_stack_securely_and_down_leaves_nothing(tmp_path: Path) -> None:
    env = fresh_env(tmp_path)
    llmp_home, home = Path(env["LLMP_HOME"]), Path(env["HOME"])
    names = [spec.name for spec in installed_services()]
    try:
        up = run_llmp(env, "up", "--timeout", str(UP_TIMEOUT_S), timeout=UP_TIMEOUT_S + 120)
        logs = {p.name: p.read_text(errors="replace")[-2000:] for p in (llmp_home / "logs").glob("*.log")}
        assert up.returncode == 0, f"{up.stdout}{up.stderr}\n{logs}"
        assert up.stdout.count("SERVING") == len(names), up.stdout

        # the secrets it made for itself, private
        assert stat.S_IMODE((llmp_home / "secrets").stat().st_mode) == 0o700
        for name in (secrets.RAY_TOKEN, secrets.REDIS_PASSWORD):
            assert stat.S_IMODE(secrets.path(llmp_home, name).stat().st_mode) == 0o600
        assert not (home / ".ray").exists(), "nothing is read from or written to ~/.ray"

        # Redis: nothing without the password, no admin commands with it
        port = int(env["LLMP_REDIS_PORT"])
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).set("llmp:probe", "1")
        client = redis.Redis(port=port, password=secrets.read(llmp_home, secrets.REDIS_PASSWORD))
        assert client.ping()
        with pytest.raises(redis.ResponseError, match="unknown command"):
            client.config_get("requirepass")

        # Ray: a job submitted without the token is refused; with it the job server answers
        jobs = f"http://127.0.0.1:{env['LLMP_RAY_DASHBOARD_PORT']}/api/jobs/"
        assert refused(jobs, data=json.dumps({"entrypoint": "echo owned"}).encode()) == 401
        assert refused(jobs, token="0" * 64) in (401, 403)
        assert refused(jobs, token=secrets.read(llmp_home, secrets.RAY_TOKEN)) == 200

        # every listener of every process of the stack is on loopback
        processes = stack_processes(llmp_home)
        assert {p.name() for p in processes} >= {"raylet", "gcs_server"}, "Ray runs inside the stack"
        sockets = listening(processes)
        assert sockets and {ip for ip, _ in sockets} <= LOOPBACK, sorted(sockets)
        ports = {port for _, port in sockets}
    finally:
        processes = stack_processes(llmp_home)
        down = run_llmp(env, "down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert set(names) | {"ray", "redis"} <= set(down.stdout.replace(",", " ").split())
    left = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert left == [], f"still running after down: {[(p.pid, p.name()) for p in left]}"
    assert list((llmp_home / "run").glob("*.json")) == []
    assert not ray_temp_dir(llmp_home).exists() or ray_temp_dir(llmp_home).is_relative_to(llmp_home)
    for port in ports:
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers after down"
