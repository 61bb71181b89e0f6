"""The KubeRay backend's RayJob object, validated against KubeRay's CRD schema; what a ray_jobs driver is handed."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from libs.common import secrets
from libs.common.artifacts import ArtifactStore
from libs.common.config import CommonConfig
from libs.common.planning import GB
from services.training.backends import driver_env, rayjob_manifest
from services.training.config import TrainingConfig
from services.training.jobs import JobContext
from services.training.jobstore import JobRecord
from tests.helpers.services import ROOT

CRD = ROOT.parent / "shared" / "k8s" / "crds" / "ray.io_rayjobs.yaml"
"""KubeRay's CRDs sit in the shared/ folder beside the repository (design.md)."""


@pytest.fixture(scope="module")
def rayjob_v1() -> jsonschema.Draft7Validator:
    """A validator for the RayJob CRD's v1 openAPIV3Schema (a large file: parsed once, with libyaml)."""
    if not CRD.exists():
        pytest.skip(f"{CRD} is not present")
    crd = yaml.load(CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return jsonschema.Draft7Validator(
        next(v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == "v1")
    )


def test_rayjob_manifest_validates_against_the_crd(rayjob_v1: jsonschema.Draft7Validator) -> None:
    job = JobRecord("train-0123456789ab", "pretrain", {"num_workers": 3}, "kuberay")
    config = TrainingConfig(kuberay_namespace="ml", kuberay_secret="ml-secrets")
    manifest = rayjob_manifest(job, config, "redis://:s3cret@redis:6379/0")
    rayjob_v1.validate(manifest)
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    assert manifest["metadata"] == {
        "name": "llmp-train-0123456789ab",
        "namespace": "ml",
        "labels": {"app.kubernetes.io/managed-by": "llmp", "llmp.dev/job-id": "train-0123456789ab"},
    }
    spec = manifest["spec"]
    assert spec["entrypoint"] == "python -m services.training.runner --job-id train-0123456789ab"
    (workers,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 3
    env = {e["name"]: e for e in workers["template"]["spec"]["containers"][0]["env"]}
    # the password and Ray's token stay in the Secret: the RayJob only names them
    assert env["LLMP_REDIS_PASSWORD"]["valueFrom"] == {"secretKeyRef": {"name": "ml-secrets", "key": "redis-password"}}
    assert env["LLMP_REDIS_URL"]["value"] == "redis://:$(LLMP_REDIS_PASSWORD)@redis:6379/0"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "ml-secrets", "key": "auth_token"}}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert "s3cret" not in str(manifest)
    # KubeRay reads the same Secret's token for its own calls to the job's Ray
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token", "secretName": "ml-secrets"}


def test_a_broken_manifest_fails_the_schema(rayjob_v1: jsonschema.Draft7Validator) -> None:
    job = JobRecord("train-0123456789ab", "pretrain", {}, "kuberay")
    manifest = rayjob_manifest(job, TrainingConfig(), "redis://redis:6379/0")
    del manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]
    with pytest.raises(jsonschema.ValidationError, match="groupName"):
        rayjob_v1.validate(manifest)


def test_a_ray_jobs_driver_is_not_handed_the_local_redis_password(tmp_path: Path) -> None:
    """Ray's dashboard shows a job's environment: the driver reads the password from LLMP_HOME instead."""
    password = secrets.ensure(tmp_path, secrets.REDIS_PASSWORD)

    def env_for(url: str) -> dict[str, str]:
        context = JobContext(
            store=None,  # type: ignore[arg-type]
            registry=None,  # type: ignore[arg-type]
            artifacts=ArtifactStore(tmp_path / "artifacts"),
            tokenizer=None,  # type: ignore[arg-type]
            redis_url=url,
            worker_memory_bytes=GB,
            ray_storage=str(tmp_path / "ray"),
        )
        return driver_env(context)

    local = env_for(f"redis://:{password}@127.0.0.1:6379/0")
    assert password not in json.dumps(local)
    assert local["LLMP_HOME"] == str(tmp_path)
    driver = CommonConfig(home=local["LLMP_HOME"], redis_url=local["LLMP_REDIS_URL"])
    assert secrets.redis_url(driver) == f"redis://:{password}@127.0.0.1:6379/0"
    other = "redis://:theirs@redis.example:6379/0"
    assert env_for(other)["LLMP_REDIS_URL"] == other  # someone else's Redis: only its URL can say how
