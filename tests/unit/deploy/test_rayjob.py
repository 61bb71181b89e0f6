"""The RayJob the training service creates in the cluster the chart deploys: configured from the
training Deployment's own environment, it must be valid (KubeRay's CRD, Kubernetes' Pod schema), run
the chart's training image, hold no secret, and fall under the chart's NetworkPolicies."""

from __future__ import annotations

from typing import Any

import pytest

from libs.common.config import load
from services.training.backends import rayjob_manifest
from services.training.config import TrainingConfig
from services.training.jobstore import JobRecord
from tests.unit.deploy.chart import Manifest, as_pod, crd_validator, find, pod_templates, render, selects, values_of

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
pytest.importorskip("helm_python", reason="helm-python-sdk (the dev extra) is not installed")
PASSWORD = "s3cretRedisPassw0rd"


def training_pod(objects: list[Manifest]) -> tuple[TrainingConfig, str, dict[str, Any]]:
    """What the training pod reads from its environment (its TrainingConfig, its Redis URL once
    Kubernetes expanded the password) and its container."""
    (deployment,) = find(objects, "Deployment", "llmp-training")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    environ = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    redis_url = environ["LLMP_REDIS_URL"].replace("$(LLMP_REDIS_PASSWORD)", PASSWORD)
    return load(TrainingConfig, "training", environ=environ), redis_url, container


@pytest.mark.parametrize("values_file", ["values.yaml", "values-gpu.yaml", "values-ci.yaml"])
def test_the_rayjob_of_a_chart_deployment_is_valid(values_file: str, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = render(values_of(values_file))
    config, redis_url, container = training_pod(objects)
    monkeypatch.setenv(
        "LLMP_TOKENIZER_ADDRESS", next(e["value"] for e in container["env"] if e["name"] == "LLMP_TOKENIZER_ADDRESS")
    )
    job = JobRecord("train-0123456789ab", "pretrain", {"num_workers": 2, "use_gpu": True}, "kuberay")
    rayjob = rayjob_manifest(job, config, redis_url)

    crd_validator("RayJob").validate(rayjob)
    assert rayjob["metadata"]["namespace"] == "llmp"
    assert rayjob["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token", "secretName": "llmp-secrets"}
    assert PASSWORD not in str(rayjob), "the Redis password stays in the Secret"
    templates = dict(pod_templates(rayjob))
    assert set(templates) == {"head", "workers workers", "submitter"}
    policies = find(objects, "NetworkPolicy")
    (jobs_policy,) = [p for p in policies if p["metadata"]["name"] == "llmp-training-jobs"]
    for where, template in templates.items():
        kubernetes_validate.validate(
            as_pod(template, f"rayjob-{where.split()[0]}"), kubernetes_validate.latest_version(), strict=True
        )
        assert selects(jobs_policy["spec"]["podSelector"], template["metadata"]["labels"]), where
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        for c in spec["containers"]:
            assert c["image"] == container["image"], "the RayJob runs the chart's training image"
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            env = {e["name"]: e for e in c["env"]}
            assert env["LLMP_REDIS_URL"]["value"].startswith("redis://:$(LLMP_REDIS_PASSWORD)@llmp-redis:6379")
            assert env["LLMP_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
                "name": "llmp-secrets",
                "key": "redis-password",
            }
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "auth_token"
            names = list(env)
            assert names.index("LLMP_REDIS_PASSWORD") < names.index("LLMP_REDIS_URL")
    worker = templates["workers workers"]["spec"]["containers"][0]
    gpus = worker["resources"]["limits"].get("nvidia.com/gpu")
    assert gpus == ("1" if values_file == "values-gpu.yaml" else None)
    claim = templates["head"]["spec"]["volumes"]
    assert {"name": "artifacts", "persistentVolumeClaim": {"claimName": "llmp-artifacts"}} in claim


def test_without_a_secret_the_redis_url_is_passed_as_given() -> None:
    """Outside the chart (no kuberay_secret), the RayJob gets the service's own Redis URL."""
    job = JobRecord("train-0123456789ab", "pretrain", {}, "kuberay")
    rayjob = rayjob_manifest(job, TrainingConfig(), "redis://redis:6379/0")
    crd_validator("RayJob").validate(rayjob)
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in head["env"]}
    assert env["LLMP_REDIS_URL"] == "redis://redis:6379/0" and "RAY_AUTH_TOKEN" not in env
    assert "authOptions" not in rayjob["spec"]["rayClusterSpec"]
