"""The local platform's secrets: generated on first use, kept under $LLMP_HOME/secrets, mode 0600.

    $LLMP_HOME/secrets/            0700
        ray.token                  Ray's authentication token (RAY_AUTH_TOKEN_PATH points here)
        redis.password             the password of the Redis `llmp up` starts
        admin.key                  the gateway's first admin API key

    token = ensure(home, RAY_TOKEN)        # the value, created (atomically, 0600) if absent
    token = read(home, RAY_TOKEN)          # the value, or None when it was never created

A secret file appears complete or not at all: it is written to a private temporary file
(O_CREAT | O_EXCL, 0600), flushed, and published with link(2), which refuses to replace a file,
so two processes starting at once agree on one value. A secret that others can read, or a folder
that others can enter, is refused rather than used. In Kubernetes the same values come from
Secrets, through the environment variables named below.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets as _random
import stat
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from libs.common.config import CommonConfig
from libs.common.errors import FailedPrecondition

FOLDER = "secrets"
RAY_TOKEN = "ray.token"
REDIS_PASSWORD = "redis.password"
ADMIN_KEY = "admin.key"

#: Ray reads these (its C++ AuthenticationTokenLoader): token mode on, and the token's file.
RAY_AUTH_MODE = "RAY_AUTH_MODE"
RAY_AUTH_TOKEN_PATH = "RAY_AUTH_TOKEN_PATH"


def new_secret() -> str:
    """256 random bits as 64 hex digits: safe in a URL, a header and a Ray token file as it is."""
    return _random.token_hex(32)


def folder(home: Path) -> Path:
    """$LLMP_HOME/secrets, created 0700; refused when group or others may enter it."""
    path = Path(home) / FOLDER
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_private(path)
    return path


def path(home: Path, name: str) -> Path:
    """Where the secret `name` lives (whether or not it exists yet)."""
    return Path(home) / FOLDER / name


def read(home: Path, name: str) -> str | None:
    """The secret's value, or None when it does not exist; refused when others can read it."""
    file = path(home, name)
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:  # a link could lead anywhere: a secret is a plain file of its own
            raise FailedPrecondition(f"{file} is a symbolic link; a secret must be a plain file") from None
        raise
    with os.fdopen(fd) as fh:
        _check_private(file, os.fstat(fd))
        return fh.read().strip() or None


def ensure(home: Path, name: str, generate: Callable[[], str] = new_secret) -> str:
    """The secret's value, generated and stored (0600) first if it does not exist yet."""
    existing = read(home, name)
    if existing is not None:
        return existing
    final = folder(home) / name
    tmp = final.with_name(f".{name}.{os.getpid()}.{_random.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(generate() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        with contextlib.suppress(FileExistsError):  # another process published first: its value wins
            os.link(tmp, final)
        _fsync_dir(final.parent)
    finally:
        tmp.unlink(missing_ok=True)
    value = read(home, name)
    assert value is not None
    return value


def _check_private(file: Path, st: os.stat_result | None = None) -> None:
    st = st or os.stat(file)
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise FailedPrecondition(
            f"{file} is open to other users (mode {stat.S_IMODE(st.st_mode):04o}); run: chmod go-rwx {file}"
        )
    if st.st_uid != os.getuid():
        raise FailedPrecondition(f"{file} belongs to another user (uid {st.st_uid})")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- how the parts use them ------------------------------------------------------------------------
def local_redis_url(home: Path, port: int, password: str | None) -> str:
    """redis://:PASSWORD@127.0.0.1:PORT/0, the form LLMP_REDIS_URL takes for the local Redis."""
    auth = f":{quote(password, safe='')}@" if password else ""
    return f"redis://{auth}127.0.0.1:{port}/0"


REDACTED = "***"


def redis_url(common: CommonConfig) -> str:
    """LLMP_REDIS_URL when it is set; else the local Redis of `llmp up`, with its password from LLMP_HOME.

    A URL whose password is redacted ('***', see `redact`) gets the password of LLMP_HOME's
    redis.password: how a process started through Ray learns it without the job showing it."""
    if common.redis_url:
        if urlsplit(common.redis_url).password == REDACTED:
            return _with_password(common.redis_url, read(common.home_path, REDIS_PASSWORD) or "")
        return common.redis_url
    return local_redis_url(common.home_path, common.redis_port, read(common.home_path, REDIS_PASSWORD))


def redact(url: str) -> str:
    """The URL with its password replaced by '***', for logs and anything a dashboard shows."""
    return _with_password(url, REDACTED) if urlsplit(url).password else url


def _with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    auth = f"{parts.username or ''}:{quote(password, safe='*')}@" if password else ""
    return urlunsplit(parts._replace(netloc=f"{auth}{host}"))


def ray_env(home: Path) -> dict[str, str]:
    """The variables that make a Ray process (head, driver, worker, CLI) use the local token."""
    return {RAY_AUTH_MODE: "token", RAY_AUTH_TOKEN_PATH: str(path(home, RAY_TOKEN))}
