"""The KubeRay backend's RayJob object, validated against KubeRay's CRD schema."""

from __future__ import annotations

import jsonschema
import pytest
import yaml

from services.training.backends import rayjob_manifest
from services.training.config import TrainingConfig
from services.training.jobstore import JobRecord
from tests.conftest import ROOT

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
    assert env["RAY_AUTH_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "ml-secrets", "key": "ray-token"}}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert "s3cret" not in str(manifest)


def test_a_broken_manifest_fails_the_schema(rayjob_v1: jsonschema.Draft7Validator) -> None:
    job = JobRecord("train-0123456789ab", "pretrain", {}, "kuberay")
    manifest = rayjob_manifest(job, TrainingConfig(), "redis://redis:6379/0")
    del manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]
    with pytest.raises(jsonschema.ValidationError, match="groupName"):
        rayjob_v1.validate(manifest)
