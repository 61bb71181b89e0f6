"""The service images `make images` builds, each run the way Kubernetes runs it: as its non-root
user, read-only root filesystem (a writable /tmp and state volume), and asked the standard gRPC
health check. Needs Podman or Docker and the images (`make images`); skipped, saying which, otherwise.

On machines whose cgroup setup crun refuses, Podman runs them with runc; the ulimits are explicit
because such machines' defaults are above what an unprivileged container may set.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from libs.common.ports import free_port
from libs.common.rpc.client import wait_serving
from tests.helpers.redis_server import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.container]

IMAGE_PREFIX = os.environ.get("LLMP_TEST_IMAGE_PREFIX", "llmp")
CHART = Path(__file__).resolve().parents[3] / "deploy" / "helm" / "llmp" / "Chart.yaml"
IMAGE_TAG = os.environ.get("LLMP_TEST_IMAGE_TAG") or yaml.safe_load(CHART.read_text())["appVersion"]
"""`make images` tags the images with the chart's appVersion unless IMAGE_TAG says otherwise."""
START_SECONDS = 300  # Ray and Serve come up inside the training and inference containers
NOT_IN = {"tokenizer": ["torch", "ray"], "gateway": ["torch", "ray"], "retrieval": ["ray"]}
"""Packages a service's image must not carry: only that service's extras are installed."""


def container_engine() -> tuple[str, list[str]] | None:
    """The engine that answers here (Podman first, then Docker) and its `run` flags, or None."""
    for engine in ("podman", "docker"):
        if shutil.which(engine) and subprocess.run([engine, "info"], capture_output=True).returncode == 0:
            runtime = ["--runtime", "runc"] if engine == "podman" and shutil.which("runc") else []
            return engine, [
                *runtime,
                "--network",
                "host",
                "--ulimit",
                "nofile=20000:20000",
                "--ulimit",
                "nproc=1024:1024",
            ]
    return None


ENGINE = container_engine()
if ENGINE is None:
    pytestmark.append(pytest.mark.skip(reason="no container engine (podman or docker) answers on this machine"))


def image(service: str, variant: str = "cpu") -> str:
    """The image of a service; the CUDA variant's tag ends in -cuda (make image-<service>-cuda)."""
    name = f"{IMAGE_PREFIX}-{service}:{IMAGE_TAG}" + ("-cuda" if variant == "cuda" else "")
    assert ENGINE is not None
    if subprocess.run([ENGINE[0], "image", "inspect", name], capture_output=True).returncode != 0:
        target = f"{service}-cuda" if variant == "cuda" else service
        pytest.skip(f"image {name} is not built here (make image-{target})")
    return name


def engine(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    assert ENGINE is not None
    return subprocess.run([ENGINE[0], *args], capture_output=True, text=True, timeout=120, check=check)


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


class Container:
    """A detached container of one service on a free loopback port; removed however the test ends."""

    def __init__(self, service: str, env: dict[str, str], variant: str = "cpu") -> None:
        assert ENGINE is not None
        self.service, self.port = service, free_port()
        self.name = f"llmp-smoke-{service}-{self.port}"
        prefix = f"LLMP_{service.upper()}"
        env = {
            f"{prefix}_HOST": "127.0.0.1",
            f"{prefix}_PORT": str(self.port),
            f"{prefix}_METRICS_PORT": "-1",
            "LLMP_LOG_FORMAT": "text",
            **env,
        }
        flags = [f"--env={k}={v}" for k, v in env.items()]
        engine(
            "run",
            "--detach",
            "--name",
            self.name,
            *ENGINE[1],
            "--read-only",
            "--tmpfs",
            "/tmp",
            "--volume",
            "/var/lib/llmp",
            "--shm-size",
            "512m",
            *flags,
            image(service, variant),
        )

    def running(self) -> bool:
        return engine("inspect", "--format", "{{.State.Running}}", self.name, check=False).stdout.strip() == "true"

    def logs(self) -> str:
        result = engine("logs", self.name, check=False)
        return (result.stdout + result.stderr)[-4000:]

    def stop(self) -> int:
        """SIGTERM (the server drains), then its exit code."""
        engine("stop", "--time", "60", self.name, check=False)
        return int(engine("inspect", "--format", "{{.State.ExitCode}}", self.name).stdout.strip())

    def remove(self) -> None:
        engine("rm", "--force", "--volumes", self.name, check=False)


def service_env(service: str, redis: RedisServer) -> dict[str, str]:
    """What each service needs to come up alone: a Redis for training, one CPU for the Ray it starts."""
    return {
        "training": {
            "LLMP_REDIS_URL": redis.url,
            "LLMP_TRAINING_RAY_NUM_CPUS": "1",
            "LLMP_TRAINING_RAY_DASHBOARD": "false",
        },
        "inference": {"LLMP_INFERENCE_RAY_NUM_CPUS": "1", "LLMP_INFERENCE_DASHBOARD": "false"},
        "gateway": {
            "LLMP_GATEWAY_ADMIN_KEY": "smoke-admin-key",
            "LLMP_GATEWAY_HTTP_PORT": str(free_port()),
            "LLMP_REDIS_URL": redis.url,
        },
    }.get(service, {})


@pytest.mark.parametrize(
    ("service", "variant"),
    [(s, "cpu") for s in ("tokenizer", "retrieval", "training", "inference", "gateway")]
    + [("training", "cuda"), ("inference", "cuda")],
)
def test_image_starts_as_non_root_and_answers_the_health_check(service: str, variant: str, redis: RedisServer) -> None:
    env = service_env(service, redis)
    container = Container(service, env, variant)
    try:
        config = json.loads(engine("image", "inspect", image(service, variant)).stdout)[0]["Config"]
        assert config["User"] == "10001:10001"
        serving = wait_serving(f"127.0.0.1:{container.port}", START_SECONDS, is_alive=container.running)
        assert serving, f"{service} did not answer SERVING:\n{container.logs()}"
        uid = engine("exec", container.name, "id", "-u").stdout.strip()
        assert uid == "10001", f"{service} runs as uid {uid}"
        top = engine("exec", container.name, "sh", "-c", "cat /proc/1/status").stdout
        assert "\nUid:\t10001\t10001\t10001\t10001" in top, "the server process (pid 1) runs as 10001"
        absent = NOT_IN.get(service, [])
        probe = "import importlib.util as u, sys; print([m for m in sys.argv[1:] if u.find_spec(m)])"
        assert engine("exec", container.name, "python", "-c", probe, *absent).stdout.strip() == "[]"
        if service in ("training", "inference", "retrieval"):
            cuda = engine("exec", container.name, "python", "-c", "import torch; print(torch.version.cuda)")
            # the CPU variant carries torch's CPU build, the CUDA one its CUDA build (which runs on CPUs too)
            assert (cuda.stdout.strip() != "None") == (variant == "cuda"), cuda.stdout
        if service == "inference":  # the builder the chart's Serve config names: Ray in this image imports it
            builder = "from services.inference.serve_app import build_app; print(build_app.__name__)"
            assert engine("exec", container.name, "python", "-c", builder).stdout.strip() == "build_app"
        if service == "gateway":
            url = f"http://127.0.0.1:{env['LLMP_GATEWAY_HTTP_PORT']}/health"
            with urllib.request.urlopen(url, timeout=10) as response:
                assert response.status == 200
        assert container.stop() == 0, f"{service} did not drain and exit cleanly:\n{container.logs()}"
    finally:
        container.remove()
