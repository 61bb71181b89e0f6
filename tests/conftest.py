"""Shared fixtures: free ports, a temporary LLMP_HOME, real service processes; hardware markers."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from libs.common.rpc.client import wait_serving
from libs.common.stack import free_port

ROOT = Path(__file__).resolve().parents[1]


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is present on this machine")
    no_kind = pytest.mark.skip(reason="needs Docker and kind; not available on this machine")
    has_kind = (
        bool(shutil.which("kind")) and subprocess.run(["docker", "info"], capture_output=True).returncode == 0
        if shutil.which("docker")
        else False
    )
    for item in items:
        if "gpu" in item.keywords and not _has_gpu():
            item.add_marker(no_gpu)
        if "kind" in item.keywords and not has_kind:
            item.add_marker(no_kind)


@dataclass
class ServiceProcess:
    name: str
    address: str
    home: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_service(
    name: str, home: Path, extra_env: dict[str, str] | None = None, metrics_port: int = -1
) -> ServiceProcess:
    """Start `python -m services.<name>` on a free port and wait until it is SERVING."""
    port = free_port()
    log = home / f"{name}-{port}.log"
    env = {**os.environ, "LLMP_HOME": str(home), "LLMP_LOG_FORMAT": "text", **(extra_env or {})}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", f"services.{name}", "--port", str(port), "--metrics-port", str(metrics_port)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    service = ServiceProcess(name, f"127.0.0.1:{port}", home, proc, log)
    if not wait_serving(service.address, 240, is_alive=lambda: proc.poll() is None):
        proc.kill()
        raise RuntimeError(f"{name} did not start:\n{service.output()}")
    return service


@pytest.fixture
def llmp_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "llmp"
    home.mkdir()
    monkeypatch.setenv("LLMP_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def tokenizer_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    service = start_service("tokenizer", tmp_path_factory.mktemp("llmp"))
    yield service
    service.stop()
