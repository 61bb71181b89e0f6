"""The chart's RayService Serve config on a real local Ray Serve, applied the way KubeRay applies it.

The chart is rendered (Helm's engine) with one model; its `serveConfigV2` goes, as KubeRay sends
it, to the Ray dashboard's `PUT /api/serve/applications/`, signed with the Ray token the pods get
from the Secret (KubeRay reads it there through authOptions; unsigned, the dashboard refuses the
config with 401); Serve's controller imports
`services.inference.serve_app:build_app` and calls it with the rendered args. The inference front
(InferenceCore over ServeBackend, configured with the same container environment the chart gives
it) starts first, as in the cluster, and attaches to the application by its name: generation
through it equals the engine's, the deployment Serve runs has the options the service would give
it, and LoadModel and UnloadModel of the managed model are refused without touching it.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from libs.common import secrets
from libs.common.artifacts import ArtifactStore
from libs.common.config import load
from libs.common.errors import FailedPrecondition
from libs.common.local_ray import reload_ray_auth
from libs.common.ports import free_port
from services.inference.config import InferenceConfig
from services.inference.core import InferenceCore
from services.inference.engine import SamplingLimits
from services.inference.schema import GenerateInput, ModelSpec, model_spec_of
from tests.unit.deploy.chart import find, render, values_of
from tests.unit.inference.test_service_core import TINY, greedy, reference, save_tiny_model

pytest.importorskip("helm_python", reason="helm-python-sdk (the dev extra) is not installed")
serve_app = pytest.importorskip("services.inference.serve_app", reason="Ray Serve (the inference extra) is missing")
pytestmark = pytest.mark.integration

MODEL = {"name": "tiny", "path": TINY, "numCpus": 0.5, "maxOngoingRequests": 4, "maxQueuedRequests": 3}
PROMPT = (5, 17, 99, 3, 42)


def chart_inference(values_file: str = "values-ci.yaml") -> tuple[dict[str, Any], dict[str, str]]:
    """The rendered RayService's Serve config and the inference front's environment (plain values)."""
    values = values_of(values_file)
    values["inference"]["models"] = [MODEL]
    (rayservice,) = find(render(values), "RayService")
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    (front,) = [c for c in head["containers"] if c["name"] == "inference"]
    env = {e["name"]: e["value"] for e in front["env"] if "value" in e}
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"]), env


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 300.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"{what}: not within {timeout:g} s"
        time.sleep(0.2)


def put_serve_config(dashboard: str, config: dict[str, Any], token: str | None) -> int:
    """What KubeRay does with a RayService's serveConfigV2 (with authOptions: signed with the Secret's token)."""
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    request = urllib.request.Request(
        f"{dashboard}/api/serve/applications/", data=json.dumps(config).encode(), method="PUT", headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as e:
        return e.code


def app_details(dashboard: str, name: str, token: str) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{dashboard}/api/serve/applications/", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.loads(reply.read())["applications"].get(name, {})


def test_the_chart_serve_config_builds_the_model_the_front_serves(tmp_path: Path) -> None:
    """The front and its Ray run in a child process: the process that starts Ray gets Ray's SIGTERM
    handler, Serve's router threads and Ray's environment for good, and that must not be pytest's."""
    child = multiprocessing.get_context("spawn").Process(target=front_with_the_chart_serve_config, args=(tmp_path,))
    child.start()
    child.join(540)
    if child.exitcode is None:
        child.kill()
        child.join()
        pytest.fail("the scenario did not end within 540 s")
    assert child.exitcode == 0, "the scenario failed in its process: its traceback is in the captured stderr"


def front_with_the_chart_serve_config(tmp_path: Path) -> None:
    # Ray's token as the chart's pods get it: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from the Secret
    ray_token = secrets.new_secret()
    os.environ.update({secrets.RAY_AUTH_MODE: "token", "RAY_AUTH_TOKEN": ray_token})
    os.environ.pop(secrets.RAY_AUTH_TOKEN_PATH, None)
    reload_ray_auth()
    config, front_env = chart_inference()
    (app,) = config["applications"]
    name = serve_app.app_name("tiny")
    assert app["name"] == name and app["import_path"] == "services.inference.serve_app:build_app"
    # the machine is shared: Serve's HTTP proxy on a free loopback port rather than the pod's 0.0.0.0:8000
    config["http_options"] = {"host": "127.0.0.1", "port": free_port()}

    home = tmp_path / "llmp"
    store = ArtifactStore(home / "artifacts")
    save_tiny_model(store.root)
    # the Ray pods' LLMP_HOME (where the builder finds the store): set before Ray starts, so its workers inherit it
    os.environ["LLMP_HOME"] = str(home)
    settings = load(InferenceConfig, "inference", environ=front_env)
    assert settings.backend == "ray" and settings.managed_models
    limits = SamplingLimits(max_n=settings.max_n, max_tokens=settings.max_tokens)
    backend = serve_app.ServeBackend(
        store,
        limits,
        ray_num_cpus=2,
        dashboard=True,
        dashboard_port=free_port(),
        messages_per_second=settings.stream_messages_per_second,
        cluster_serve=True,
    )
    core = InferenceCore(settings, store, backend)
    spec = model_spec_of(app["args"])
    expected = reference(store, list(PROMPT), greedy())

    async def scenario() -> None:
        await core.start()  # the front is up before KubeRay applies the config (it must be, for the head to be ready)
        assert core.model_names() == ["tiny"]
        dashboard = backend.dashboard_url
        assert await asyncio.to_thread(put_serve_config, dashboard, config, None) == 401, "unsigned: refused"
        assert await asyncio.to_thread(put_serve_config, dashboard, config, ray_token) == 200

        def running() -> bool:
            details = app_details(dashboard, name, ray_token)
            assert details.get("status") != "DEPLOY_FAILED", details.get("message")
            return details.get("status") == "RUNNING"

        await asyncio.to_thread(wait_until, running, f"{name} RUNNING")
        details = await asyncio.to_thread(app_details, dashboard, name, ray_token)
        assert details["deployed_app_config"]["args"] == app["args"]
        (deployment,) = details["deployments"].values()
        wanted = serve_app.deployment_options(spec)
        deployed = deployment["deployment_config"]
        assert deployment["name"] == wanted["name"]
        assert deployed["max_ongoing_requests"] == wanted["max_ongoing_requests"] == MODEL["maxOngoingRequests"]
        assert deployed["max_queued_requests"] == wanted["max_queued_requests"] == MODEL["maxQueuedRequests"]
        autoscaling = deployed["autoscaling_config"]
        assert {k: autoscaling[k] for k in wanted["autoscaling_config"]} == wanted["autoscaling_config"]
        assert deployed["ray_actor_options"]["num_cpus"] == 0.5

        answer = await core.generate("tiny", GenerateInput("", greedy(), token_ids=PROMPT))
        assert answer.completions[0].token_ids == expected
        info = await core.model_info("tiny")
        assert info.spec == spec and info.facts.model_type == "llama"

        with pytest.raises(FailedPrecondition, match="'tiny' is deployed by the cluster's Serve config"):
            await core.load_model(ModelSpec("tiny", TINY))
        with pytest.raises(FailedPrecondition, match="'tiny'"):
            await core.unload_model("tiny")
        after = await asyncio.to_thread(app_details, dashboard, name, ray_token)
        assert after["status"] == "RUNNING" and after["last_deployed_time_s"] == details["last_deployed_time_s"]
        assert after["deployed_app_config"]["import_path"] == app["import_path"], "still the config's, not serve.run's"
        again = await core.generate("tiny", GenerateInput("", greedy(), token_ids=PROMPT))
        assert again.completions[0].token_ids == expected

    try:
        asyncio.run(scenario())
    finally:
        asyncio.run(core.drain())
