"""A local Ray as secure as the stack's: where its files live, and what its processes run with.

The local stack (`llmp up`) starts the Ray head with these settings; a process that starts a Ray of
its own (the training service without a cluster) calls `secure_local_ray` first. Either way Ray
runs with token authentication (the token of $LLMP_HOME/secrets), every listener on 127.0.0.1, and
its temp and session folders in a private folder under $LLMP_HOME (or in /tmp when that path is
too long for Ray's unix sockets).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

from libs.common import secrets as platform_secrets
from libs.common.errors import FailedPrecondition

#: Ray keeps unix sockets in <temp>/session_<date>_<time>_<us>_<pid>/sockets/plasma_store: 64
#: characters past the temp folder, within the 107 a socket path may have.
RAY_TEMP_MAX_CHARS = 40


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
