"""A service started as its own process (`python -m services.<name>`) on a free port, as a user starts it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from libs.common.ports import free_port
from libs.common.rpc.client import wait_serving

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ServiceProcess:
    name: str
    address: str
    home: Path
    proc: subprocess.Popen[bytes]
    log: Path
    metrics_address: str = ""
    """host:port of its Prometheus endpoint, where started with a metrics port."""

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
            start_new_session=True,  # a signal meant for the service's process group never reaches pytest
        )
    metrics = f"127.0.0.1:{metrics_port}" if metrics_port > 0 else ""
    service = ServiceProcess(name, f"127.0.0.1:{port}", home, proc, log, metrics)
    if not wait_serving(service.address, 240, is_alive=lambda: proc.poll() is None):
        proc.kill()
        raise RuntimeError(f"{name} did not start:\n{service.output()}")
    return service
