"""Ports: a free one for tests and helpers, and a taken one reported in one line that names its variable.

    ensure_free("127.0.0.1", 50051, "LLMP_TOKENIZER_PORT")
    # PortInUse: port 50051 is in use: set LLMP_TOKENIZER_PORT
"""

from __future__ import annotations

import errno
import socket

from libs.common.errors import FailedPrecondition


class PortInUse(FailedPrecondition):
    """A port something else listens on; the message is the one line a user needs."""

    def __init__(self, port: int, variable: str) -> None:
        super().__init__(f"port {port} is in use: set {variable}")
        self.port, self.variable = port, variable


def free_port() -> int:
    """A port nothing listens on now, chosen by the kernel."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_free(host: str, port: int, variable: str) -> None:
    """Raise PortInUse when `host:port` cannot be bound now (port 0, "any free one", always can)."""
    if port <= 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        # as servers do: a port whose old connections linger in TIME_WAIT is not "in use"
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                raise PortInUse(port, variable) from None
            raise
