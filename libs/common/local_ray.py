"""A local Ray as secure as the stack's: where its files live, and what its processes run with.

The local stack (`llmp up`) starts the Ray head with these settings; a process that starts a Ray of
its own (a service without a cluster: training, inference, retrieval's Ray Data) calls
`start_local_ray`. Either way Ray runs with token authentication (the token of
$LLMP_HOME/secrets), every listener on 127.0.0.1, and
its temp and session folders in a private folder under $LLMP_HOME (or in /tmp when that path is
too long for Ray's unix sockets).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from libs.common import secrets as platform_secrets
from libs.common.errors import FailedPrecondition
from libs.common.ports import free_port

log = logging.getLogger(__name__)

#: Ray's own start-up has fixed waits (the raylet's 30 s to register, the GCS's port file) that a
#: busy machine can miss; a start that fails is shut down and made again, this many times in all.
RAY_START_ATTEMPTS = 3
#: How long Ray waits for its GCS to come up (Ray's default is 30 s).
GCS_START_SECONDS = 120

#: How often Ray Serve's controller runs its control loop (Serve's default is 0.1 s). Each pass
#: checks every deployment, replica and proxy; at ten a second the controller took a third to a
#: half of one core whatever the request rate, a share the replicas' engines lose on a small
#: machine. The cost of a slower loop is that deployments, scale-ups and failed replicas are acted on
#: within this time rather than 0.1 s. An operator's own value (the variable set) is kept.
SERVE_CONTROL_LOOP_S = "0.5"

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
        "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": os.environ.get("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", SERVE_CONTROL_LOOP_S),
    }


def secure_local_ray(home: Path) -> str:
    """Set up this process to start its own local Ray (`ray.init(address="local", _temp_dir=...)`)
    as securely as the stack's: token authentication, loopback only. Returns the temp folder to
    pass as `_temp_dir`. Ray reads the loopback and token settings at import; where it is already
    imported they are applied to it here."""
    os.environ.update(local_ray_env(home))
    reload_ray_auth()
    if "ray" in sys.modules:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False  # what RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 sets at import
    return str(make_ray_temp_dir(home))


def reload_ray_auth() -> None:
    """Make an imported Ray read RAY_AUTH_MODE and its token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH) again
    after they changed, as Ray's own token setup does; nothing to do before `import ray`."""
    if "ray" in sys.modules:
        from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def announce_local_gcs_port() -> None:
    """Fix the port of the local Ray's GCS and name it in RAY_ADDRESS before starting that Ray.

    Ray's processes inherit the environment. Code in them that looks for "the cluster" without an
    address reads RAY_ADDRESS, else the address `ray start` last wrote under /tmp/ray: another Ray's,
    often one that has stopped. Ray Train's placement-group cleaner asks the state API whether its
    controller is alive, and there it waits out a connection timeout that held the end of every
    training run for 12 s. A fixed port also spares the start its wait for the GCS's port file.
    """
    port = free_port()
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"


def start_local_ray(home: Path, **init: Any) -> Any:
    """Start a new Ray of this process's own (never another process's that happens to run here), as
    secure as the stack's (`secure_local_ray`), and return `ray.init`'s context. `init` is passed to
    `ray.init` (num_cpus, namespace, dashboard settings). A start that fails (a busy machine can miss
    one of Ray's fixed start-up waits) is shut down and tried again, RAY_START_ATTEMPTS times in all."""
    temp = secure_local_ray(home)
    os.environ.setdefault("RAY_gcs_server_port_wait_time_s", str(GCS_START_SECONDS))
    import ray  # after the environment is set: Ray reads part of it at import

    # the new Ray's processes keep the announced address; this process gets its own back, so that
    # what it starts later (a service, in tests) is not sent to this Ray
    before = {name: os.environ.get(name) for name in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    try:
        for attempt in range(1, RAY_START_ATTEMPTS):
            announce_local_gcs_port()
            try:
                return ray.init(address="local", _temp_dir=temp, **init)
            except Exception:
                ray.shutdown()
                log.warning("Ray did not start (attempt %d of %d); again", attempt, RAY_START_ATTEMPTS, exc_info=True)
        announce_local_gcs_port()
        return ray.init(address="local", _temp_dir=temp, **init)  # the last attempt: its failure is the caller's
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
