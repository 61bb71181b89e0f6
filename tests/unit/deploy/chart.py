"""Rendering the llmp chart with Helm's own engine (helm-python-sdk binds Helm's Go SDK), and the
schemas its objects are checked against: Kubernetes' (kubernetes-validate) and KubeRay's CRDs
(../shared/k8s/crds beside the repository)."""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "deploy" / "helm" / "llmp"
# ../shared beside the repository (a worktree sits one folder deeper: the nearest ancestor's shared/)
CRDS = next(
    (p / "shared" / "k8s" / "crds" for p in ROOT.parents if (p / "shared" / "k8s" / "crds").is_dir()),
    ROOT.parent / "shared" / "k8s" / "crds",
)
VALUES_FILES = sorted(p.name for p in CHART.glob("values*.yaml"))
RELEASE, NAMESPACE = "llmp", "llmp"
RAY_KINDS = {"RayService": "rayservices", "RayJob": "rayjobs", "RayCluster": "rayclusters"}
Manifest = dict[str, Any]


def values_of(name: str) -> dict[str, Any]:
    """A shipped values file (values.yaml: nothing beyond the chart's defaults)."""
    return {} if name == "values.yaml" else yaml.safe_load((CHART / name).read_text()) or {}


def render(values: dict[str, Any] | None = None) -> list[Manifest]:
    """Every object the chart makes for `values`, tests included (as `helm template` would)."""
    import helm_python as helm

    with helm.Chart.load(str(CHART)) as chart:
        rendered = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [
        doc
        for path, text in sorted(rendered.items())
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def find(objects: list[Manifest], kind: str, name: str | None = None) -> list[Manifest]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


@cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    """The v1 openAPIV3Schema of a KubeRay CRD (large files: parsed once each, with libyaml)."""
    text = (CRDS / f"ray.io_{RAY_KINDS[kind]}.yaml").read_text()
    crd = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    schema = next(v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(schema)


def pod_templates(obj: Manifest) -> Iterator[tuple[str, Manifest]]:
    """(where, pod template) of every pod an object makes: workloads, Ray head and worker groups, bare pods."""
    kind, spec = obj["kind"], obj.get("spec", {})
    if kind == "Pod":
        yield "pod", {"metadata": obj["metadata"], "spec": spec}
    elif kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        yield "template", spec["template"]
    elif kind in RAY_KINDS:
        cluster = spec.get("rayClusterConfig") or spec.get("rayClusterSpec") or spec
        yield "head", cluster["headGroupSpec"]["template"]
        for group in cluster.get("workerGroupSpecs", []):
            yield f"workers {group['groupName']}", group["template"]
        if "submitterPodTemplate" in spec:
            yield "submitter", spec["submitterPodTemplate"]


def as_pod(template: Manifest, name: str) -> Manifest:
    """A pod template as a Pod object, so Kubernetes' schema checks its spec."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, **template.get("metadata", {})},
        "spec": template["spec"],
    }


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a LabelSelector (matchLabels and matchExpressions) selects these labels."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if (op == "In" and labels.get(key) not in values) or (op == "NotIn" and labels.get(key) in values):
            return False
        if (op == "Exists" and key not in labels) or (op == "DoesNotExist" and key in labels):
            return False
    return True
