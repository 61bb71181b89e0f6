"""The llmp Helm chart, rendered by Helm's engine for its defaults and every shipped values file:
lint, Kubernetes' and KubeRay's schemas, and the security and wiring properties of what it makes.

Run: .venv/bin/python -m pytest tests/unit/deploy -q
"""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest
import yaml

from libs.common import secrets
from services.inference.core import managed_specs
from services.inference.schema import model_spec_of
from tests.unit.deploy.chart import (
    CHART,
    CRDS,
    NAMESPACE,
    RAY_KINDS,
    VALUES_FILES,
    Manifest,
    as_pod,
    crd_validator,
    find,
    pod_templates,
    render,
    selects,
    values_of,
)

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (the dev extra) is not installed")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
KUBE_VERSION = kubernetes_validate.latest_version()
serve_app = pytest.importorskip("services.inference.serve_app", reason="Ray Serve (the inference extra) is missing")
app_name, deployment_options = serve_app.app_name, serve_app.deployment_options
ServeDeploySchema = pytest.importorskip("ray.serve.schema").ServeDeploySchema
SERVICES = ("tokenizer", "retrieval", "training", "inference")
"""The services behind the gateway, each reached through LLMP_<NAME>_ADDRESS."""


@pytest.fixture(scope="module", params=VALUES_FILES)
def rendered(request: pytest.FixtureRequest) -> list[Manifest]:
    return render(values_of(request.param))


@pytest.fixture(scope="module")
def default() -> list[Manifest]:
    return render()


def containers(template: Manifest) -> list[Manifest]:
    spec = template["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def env_of(container: Manifest) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def all_pods(objects: list[Manifest]) -> list[tuple[str, Manifest]]:
    return [(f"{o['kind']}/{o['metadata']['name']} {where}", t) for o in objects for where, t in pod_templates(o)]


# -- Helm's own checks --------------------------------------------------------------------------


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_lint_is_clean(values_file: str) -> None:
    """`helm lint --strict`: no warning or error. The KubeRay operator subchart is fetched by
    `helm dependency build` (a chart repository this machine may not reach); until then lint names it
    missing, and that finding alone is allowed."""
    report = helm.lint(str(CHART), values_of(values_file), strict=True, namespace=NAMESPACE)
    fetched = any((CHART / "charts").glob("kuberay-operator-*.tgz"))
    findings = [
        m["error"]
        for m in report["messages"]
        if m["severity"] >= 2 and (fetched or "missing these dependencies: kuberay-operator" not in m["error"])
    ]
    assert findings == []


def test_the_schema_rejects_a_misspelt_key() -> None:
    for typo, key in [
        ({"gateway": {"replica": 2}}, "replica"),
        ({"gatway": {}}, "gatway"),
        ({"inference": {"serve": {"maxOngoingRequest": 4}}}, "maxOngoingRequest"),
        ({"inference": {"models": [{"name": "a", "path": "models/a/1", "numCPUs": 1}]}}, "numCPUs"),
    ]:
        with pytest.raises(helm.HelmError, match=key):
            render(typo)


def test_the_schema_rejects_a_wrong_type_and_an_unknown_variant() -> None:
    with pytest.raises(helm.HelmError, match="replicas"):
        render({"tokenizer": {"replicas": "two"}})
    with pytest.raises(helm.HelmError, match="variant"):
        render({"image": {"variant": "rocm"}})


# -- schemas ------------------------------------------------------------------------------------


def test_every_object_is_valid_against_kubernetes_and_kuberay_schemas(rendered: list[Manifest]) -> None:
    """Core objects against Kubernetes' schemas (strict: an unknown field fails); RayService, RayJob and
    RayCluster against KubeRay's CRDs, and each of their pod templates as a Pod against Kubernetes'."""
    assert CRDS.is_dir(), f"KubeRay's CRD schemas are expected in {CRDS}"
    checked = set()
    for obj in rendered:
        if obj["kind"] in RAY_KINDS:
            crd_validator(obj["kind"]).validate(obj)
            for where, template in pod_templates(obj):
                kubernetes_validate.validate(
                    as_pod(template, f"{obj['metadata']['name']}-{where.split()[0]}"), KUBE_VERSION, strict=True
                )
        else:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        checked.add(obj["kind"])
    assert {"Deployment", "Service", "Secret", "NetworkPolicy", "PersistentVolumeClaim", "RayService", "Pod"} <= checked


def test_a_broken_object_fails_the_validation() -> None:
    """The checks above can fail: a misspelt field in a Deployment and a RayService."""
    default = render()
    (deployment,) = find(default, "Deployment", "llmp-tokenizer")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)
    (rayservice,) = find(default, "RayService")
    del rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    with pytest.raises(Exception, match="template"):
        crd_validator("RayService").validate(rayservice)


def test_the_service_monitor_and_hpa_when_turned_on() -> None:
    on = {"enabled": True, "minReplicas": 2, "maxReplicas": 5, "targetCPUUtilizationPercentage": 60}
    objects = render({"serviceMonitor": {"enabled": True}, "gateway": {"autoscaling": on}})
    (monitor,) = find(objects, "ServiceMonitor")
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"metrics", "http"}
    (hpa,) = find(objects, "HorizontalPodAutoscaler")
    kubernetes_validate.validate(hpa, KUBE_VERSION, strict=True)
    assert hpa["spec"]["scaleTargetRef"]["name"] == "llmp-gateway" and hpa["spec"]["maxReplicas"] == 5
    (gateway,) = find(objects, "Deployment", "llmp-gateway")
    assert "replicas" not in gateway["spec"], "the HPA owns the replica count"


# -- security -----------------------------------------------------------------------------------


def test_no_container_runs_as_root_and_every_one_is_restricted(rendered: list[Manifest]) -> None:
    pods = all_pods(rendered)
    assert len(pods) >= 7  # 4 Deployments, the Ray head and workers, the test pod (+ Redis, Qdrant)
    for where, template in pods:
        pod = template["spec"]
        context = pod.get("securityContext", {})
        assert context.get("runAsNonRoot") is True and context.get("runAsUser", 0) != 0, where
        assert context.get("seccompProfile") == {"type": "RuntimeDefault"}, where
        assert not pod.get("hostNetwork") and not pod.get("hostPID"), where
        for c in containers(template):
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, (where, c["name"])
            assert sc.get("readOnlyRootFilesystem") is True, (where, c["name"])
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], (where, c["name"])
            assert not sc.get("privileged") and sc.get("runAsUser", 1) != 0, (where, c["name"])
            assert all("hostPort" not in p for p in c.get("ports", [])), (where, c["name"])


def test_every_container_has_requests_and_limits(rendered: list[Manifest]) -> None:
    for where, template in all_pods(rendered):
        for c in containers(template):
            resources = c.get("resources", {})
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), (where, c["name"])
            assert "memory" in resources.get("limits", {}), (where, c["name"])
    for rayservice in find(rendered, "RayService"):
        autoscaler = rayservice["spec"]["rayClusterConfig"]["autoscalerOptions"]
        assert autoscaler["resources"]["limits"] and autoscaler["securityContext"]["readOnlyRootFilesystem"]


def test_only_the_gateway_is_reachable_from_outside(rendered: list[Manifest]) -> None:
    exposed = [
        s["metadata"]["name"] for s in find(rendered, "Service") if s["spec"].get("type", "ClusterIP") != "ClusterIP"
    ]
    assert set(exposed) <= {"llmp-gateway"}
    for ingress in find(rendered, "Ingress"):
        backends = {p["backend"]["service"]["name"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]}
        assert backends == {"llmp-gateway"}
    for rayservice in find(rendered, "RayService"):
        spec = rayservice["spec"]
        # KubeRay's head Service (dashboard, job API, GCS) and Serve Service stay ClusterIP
        assert spec["rayClusterConfig"]["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
        assert "serveService" not in spec


def test_the_gateway_can_be_exposed_with_an_ingress_and_a_load_balancer() -> None:
    objects = render(
        {"gateway": {"service": {"type": "LoadBalancer"}, "ingress": {"enabled": True, "host": "a.example"}}}
    )
    (ingress,) = find(objects, "Ingress")
    assert ingress["spec"]["rules"][0]["host"] == "a.example"
    exposed = [s["metadata"]["name"] for s in find(objects, "Service") if s["spec"]["type"] != "ClusterIP"]
    assert exposed == ["llmp-gateway"]


def test_secrets_are_generated_unless_given_and_read_by_reference(default: list[Manifest]) -> None:
    (secret,) = find(default, "Secret")
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert set(data) == {"admin-key", "redis-password", "auth_token"}
    assert all(re.fullmatch(r"[A-Za-z0-9]{48}", v) for v in data.values()), "generated: 48 letters and digits"
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    given = render({"auth": {"adminKey": "k-given"}})
    assert base64.b64decode(find(given, "Secret")[0]["data"]["admin-key"]) == b"k-given"
    assert find(render({"auth": {"existingSecret": "mine"}}), "Secret") == []
    for where, template in all_pods(default):
        for c in containers(template):
            for e in c.get("env", []):
                assert not any(v in str(e.get("value", "")) for v in data.values()), (
                    f"{where}: {e['name']} holds a secret"
                )


def test_the_redis_url_expands_the_password_from_the_secret(rendered: list[Manifest]) -> None:
    """LLMP_REDIS_URL uses $(LLMP_REDIS_PASSWORD), which Kubernetes expands only from a variable listed before it."""
    seen = 0
    for where, template in all_pods(rendered):
        for c in containers(template):
            names = [e["name"] for e in c.get("env", [])]
            if "LLMP_REDIS_URL" in names:
                url = env_of(c)["LLMP_REDIS_URL"]
                assert url.startswith("redis://:$(LLMP_REDIS_PASSWORD)@"), where
                assert names.index("LLMP_REDIS_PASSWORD") < names.index("LLMP_REDIS_URL"), where
                seen += 1
    assert seen >= 5


def test_the_training_service_account_manages_rayjobs_and_nothing_else(default: list[Manifest]) -> None:
    (role,) = find(default, "Role")
    assert role["rules"] == [
        {
            "apiGroups": ["ray.io"],
            "resources": ["rayjobs"],
            "verbs": ["create", "get", "list", "watch", "delete", "patch"],
        }
    ]
    assert find(default, "ClusterRole") == [] and find(default, "ClusterRoleBinding") == []
    (binding,) = find(default, "RoleBinding")
    (training,) = find(default, "Deployment", "llmp-training")
    account = training["spec"]["template"]["spec"]["serviceAccountName"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
    others = [d for d in find(default, "Deployment") if d is not training]
    assert all(d["spec"]["template"]["spec"]["automountServiceAccountToken"] is False for d in others)


# -- wiring -------------------------------------------------------------------------------------


def serving_pods(objects: list[Manifest], service: Manifest) -> list[Manifest]:
    """The pod templates a Service selects."""
    return [
        t
        for _, t in all_pods(objects)
        if selects({"matchLabels": service["spec"]["selector"]}, t.get("metadata", {}).get("labels", {}))
    ]


def target_container(objects: list[Manifest], host: str, port: int) -> tuple[Manifest, Manifest]:
    """The container a `host:port` address reaches: the Service, its port, and the container port it targets."""
    services = find(objects, "Service", host)
    assert len(services) == 1, f"no Service {host}"
    (service,) = services
    (sport,) = [p for p in service["spec"]["ports"] if p["port"] == port] or [None]
    assert sport is not None, f"Service {host} has no port {port}"
    found = [
        (t, c)
        for t in serving_pods(objects, service)
        for c in t["spec"]["containers"]
        for p in c.get("ports", [])
        if sport["targetPort"] in (p.get("name"), p["containerPort"])
    ]
    assert found, f"no pod behind {host} listens on {sport['targetPort']}"
    return found[0]


def test_each_service_address_reaches_that_service(rendered: list[Manifest]) -> None:
    """LLMP_<NAME>_ADDRESS in every container leads, through a Service, to the container that serves
    <name> on that port (its LLMP_<NAME>_PORT)."""
    checked = 0
    for where, template in all_pods(rendered):
        for c in containers(template):
            for name, value in env_of(c).items():
                match = re.fullmatch(r"LLMP_([A-Z]+)_ADDRESS", name)
                if not match:
                    continue
                service = match.group(1)
                host, port = value.rsplit(":", 1)
                _, target = target_container(rendered, host, int(port))
                assert env_of(target).get(f"LLMP_{service}_PORT") == port, (where, name, target["name"])
                checked += 1
    assert checked >= 4 * len(SERVICES)


def test_redis_and_qdrant_urls_reach_their_servers() -> None:
    objects = render()
    (retrieval,) = find(objects, "Deployment", "llmp-retrieval")
    env = env_of(retrieval["spec"]["template"]["spec"]["containers"][0])
    assert env["LLMP_QDRANT_URL"] == "http://llmp-qdrant:6333"
    _, qdrant = target_container(objects, "llmp-qdrant", 6333)
    assert qdrant["name"] == "qdrant"
    _, redis = target_container(objects, "llmp-redis", 6379)
    assert "--appendonly yes" in redis["args"][0] and "--requirepass" in redis["args"][0]
    external = render(values_of("values-external.yaml"))
    assert find(external, "StatefulSet") == []
    (retrieval,) = find(external, "Deployment", "llmp-retrieval")
    env = env_of(retrieval["spec"]["template"]["spec"]["containers"][0])
    assert env["LLMP_QDRANT_URL"] == "http://qdrant.data.svc.cluster.local:6333"
    assert env["LLMP_REDIS_URL"] == "redis://:$(LLMP_REDIS_PASSWORD)@redis.data.svc.cluster.local:6379/0"


def test_probes_ask_the_grpc_health_service_on_the_serving_port(rendered: list[Manifest]) -> None:
    """Every llmp server (the four Deployments, the gateway and the inference front) has native gRPC
    startup, readiness and liveness probes on the port it serves (LLMP_<NAME>_PORT)."""
    probed = set()
    for _, template in all_pods(rendered):
        for c in template["spec"]["containers"]:
            ports = {k: v for k, v in env_of(c).items() if re.fullmatch(r"LLMP_[A-Z]+_PORT", k)}
            if not ports:
                continue
            (port,) = ports.values()
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert c[probe]["grpc"] == {"port": int(port)}, (c["name"], probe)
            probed.add(c["name"])
    assert probed == {"gateway", *SERVICES}


def test_the_rayservice_serve_config_carries_the_model_settings() -> None:
    models = [
        {"name": "tiny", "path": "models/tiny/1", "quantization": "int8", "maxQueuedRequests": 7},
        {"name": "draft", "path": "models/draft/2", "speculative": "ngram", "autoscaling": {"maxReplicas": 3}},
    ]
    values = values_of("values-gpu.yaml")
    values["inference"]["models"] = models
    (rayservice,) = find(render(values), "RayService")
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)  # Ray Serve's own schema of a Serve config
    apps = {a["name"]: a for a in config["applications"]}
    assert set(apps) == {app_name("tiny"), app_name("draft")}
    assert {a["import_path"] for a in apps.values()} == {"services.inference.serve_app:build_app"}
    # the builder's deployment, from the args alone (the config overrides none of its options)
    tiny, draft = (deployment_options(model_spec_of(apps[app_name(n)]["args"])) for n in ("tiny", "draft"))
    assert not any("deployments" in a for a in apps.values())
    assert tiny["max_queued_requests"] == 7 and tiny["max_ongoing_requests"] == 128
    replica_env = {"runtime_env": {"env_vars": serve_app.replica_env(True)}}  # Serve's settings, the preloads
    assert tiny["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1, **replica_env}
    assert draft["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 64}
    tiny_args, draft_args = apps[app_name("tiny")]["args"], apps[app_name("draft")]["args"]
    assert tiny_args["engine"]["quantization"] == "int8" and tiny_args["path"] == "models/tiny/1"
    assert draft_args["engine"]["speculative"] == "ngram" and draft_args["engine"]["dtype"] == "bfloat16"
    # the front attaches to exactly these applications and never loads them itself
    front = next(c for c in rayservice_pod(rayservice)["containers"] if c["name"] == "inference")
    managed = managed_specs(env_of(front)["LLMP_INFERENCE_MANAGED_MODELS"])
    assert managed == {a["args"]["name"]: model_spec_of(a["args"]) for a in apps.values()}
    (workers,) = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    (worker,) = workers["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1" and workers["rayStartParams"] == {"num-gpus": "1"}
    assert worker["image"].endswith("-cuda")


def rayservice_pod(rayservice: Manifest) -> Manifest:
    return rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]


def test_without_models_the_serve_config_is_empty_and_the_front_manages_none(default: list[Manifest]) -> None:
    (rayservice,) = find(default, "RayService")
    assert yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"] == []
    front = next(c for c in rayservice_pod(rayservice)["containers"] if c["name"] == "inference")
    # set, even empty: Serve is the cluster's (KubeRay starts it with the config's proxy), not the front's
    assert env_of(front)["LLMP_INFERENCE_MANAGED_MODELS"] == "[]"
    assert managed_specs(env_of(front)["LLMP_INFERENCE_MANAGED_MODELS"]) == {}


def test_ray_runs_with_the_token_of_the_secret_everywhere(rendered: list[Manifest]) -> None:
    """KubeRay's authOptions (this CRD version has it) names the chart's Secret, whose key auth_token is
    KubeRay's own: the operator then signs its dashboard calls (Serve config, job status) with that
    token and gives it to the containers it adds (the autoscaler). Every container of a Ray pod, the
    inference front included, runs with RAY_AUTH_MODE=token and that Secret's token, as the services
    expect (libs/common/secrets.py: the same variables the local stack sets)."""
    schema = crd_validator("RayService").schema["properties"]["spec"]["properties"]["rayClusterConfig"]
    assert schema["properties"]["authOptions"]["properties"]["mode"]["enum"] == ["disabled", "token"]
    secret_name = "llmp-secrets"
    secret = find(rendered, "Secret", secret_name)
    if secret:
        assert "auth_token" in secret[0]["data"]
    (rayservice,) = find(rendered, "RayService")
    assert rayservice["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token", "secretName": secret_name}
    token = {"secretKeyRef": {"name": secret_name, "key": "auth_token"}}
    ray_pods = [(w, t) for w, t in all_pods(rendered) if w.startswith("RayService/")]
    assert len(ray_pods) == 2
    for where, template in ray_pods:
        for c in containers(template):
            env = env_of(c)
            assert env.get(secrets.RAY_AUTH_MODE) == "token" and env.get("RAY_AUTH_TOKEN") == token, (where, c["name"])
            assert secrets.RAY_AUTH_TOKEN_PATH not in env, "the token comes from the Secret, not a file"
    existing = render({"auth": {"existingSecret": "mine"}})
    (rayservice,) = find(existing, "RayService")
    assert rayservice["spec"]["rayClusterConfig"]["authOptions"]["secretName"] == "mine"


def test_the_serve_controller_loop_interval_is_the_values_on_every_ray_node() -> None:
    for seconds in (0.5, 2):
        (rayservice,) = find(render({"inference": {"serveControlLoopSeconds": seconds}}), "RayService")
        nodes = [c for _, t in all_pods([rayservice]) for c in containers(t) if c["name"].startswith("ray-")]
        assert [c["name"] for c in nodes] == ["ray-head", "ray-worker"]
        assert all(env_of(c)["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == str(seconds) for c in nodes)


def test_every_workload_has_a_disruption_budget(rendered: list[Manifest]) -> None:
    """A PodDisruptionBudget selects the pods of each Deployment and of the Ray head and workers."""
    budgets = find(rendered, "PodDisruptionBudget")
    for where, template in all_pods(rendered):
        if where.startswith("Pod/") or where.startswith("StatefulSet/"):
            continue  # the helm test pod; Redis and Qdrant run one replica each, with their volume
        labels = template.get("metadata", {}).get("labels", {})
        assert any(selects(b["spec"]["selector"], labels) for b in budgets), where


def test_the_helm_test_calls_the_gateway_with_the_admin_key(default: list[Manifest]) -> None:
    (pod,) = find(default, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod["spec"]["containers"]
    env = env_of(container)
    assert env["LLMP_GATEWAY_ADMIN_KEY"] == {"secretKeyRef": {"name": "llmp-secrets", "key": "admin-key"}}
    host, port = env["GATEWAY_URL"].removeprefix("http://").rsplit(":", 1)
    _, gateway = target_container(default, host, int(port))
    assert gateway["name"] == "gateway" and env_of(gateway)["LLMP_GATEWAY_HTTP_PORT"] == port
    script = container["args"][0]
    assert 'get("/v1/models", os.environ["LLMP_GATEWAY_ADMIN_KEY"])' in script and "== 401" in script


def test_default_values_are_cpu_only(default: list[Manifest]) -> None:
    for _, template in all_pods(default):
        for c in containers(template):
            assert "nvidia.com/gpu" not in c["resources"].get("limits", {}), c["name"]
            assert not c["image"].endswith("-cuda")


# -- network policies ---------------------------------------------------------------------------


def pod_labels(objects: list[Manifest], component: str) -> dict[str, str]:
    for _, template in all_pods(objects):
        labels = template.get("metadata", {}).get("labels", {})
        if labels.get("app.kubernetes.io/component") == component:
            return labels
    raise AssertionError(f"no pod of {component}")


def _peer_matches(peer: dict[str, Any], labels: dict[str, str] | None) -> bool:
    if labels is None:  # outside the namespace and the cluster: only an ipBlock admits it
        return "ipBlock" in peer
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" in peer:
        ns_ok = selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": NAMESPACE})
        return ns_ok and selects(peer.get("podSelector", {}), labels)
    return selects(peer.get("podSelector", {}), labels)


def _allows(
    policies: list[Manifest], direction: str, subject: dict[str, str], peer: dict[str, str] | None, port: int
) -> bool:
    """Whether the policies selecting `subject` let traffic in (or out) from (to) `peer` on `port`;
    a pod no policy of that direction selects is unrestricted."""
    kind, peers = ("Ingress", "from") if direction == "ingress" else ("Egress", "to")
    chosen = [p for p in policies if kind in p["spec"]["policyTypes"] and selects(p["spec"]["podSelector"], subject)]
    if not chosen:
        return True
    for policy in chosen:
        for rule in policy["spec"].get(direction) or []:
            port_ok = "ports" not in rule or any(p.get("port") == port for p in rule["ports"])
            peer_ok = peers not in rule or any(_peer_matches(x, peer) for x in rule[peers])
            if port_ok and peer_ok:
                return True
    return False


def reachable(policies: list[Manifest], src: dict[str, str] | None, dst: dict[str, str], port: int) -> bool:
    out = src is None or _allows(policies, "egress", src, dst, port)
    return out and _allows(policies, "ingress", dst, src, port)


def test_every_pod_is_covered_by_a_network_policy(rendered: list[Manifest]) -> None:
    policies = find(rendered, "NetworkPolicy")
    if not policies:
        pytest.fail("network policies are on in every shipped values file")
    (deny,) = [p for p in policies if p["metadata"]["name"].endswith("-default-deny")]
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    for where, template in all_pods(rendered):
        labels = template.get("metadata", {}).get("labels", {})
        own = [p for p in policies if p["spec"]["podSelector"] and selects(p["spec"]["podSelector"], labels)]
        assert own, f"{where}: no NetworkPolicy names its allowed paths"


def test_network_policies_allow_the_platform_paths_and_nothing_else(default: list[Manifest]) -> None:
    policies = find(default, "NetworkPolicy")
    pod = {c: pod_labels(default, c) for c in ("gateway", *SERVICES, "redis", "qdrant", "inference-worker", "test")}
    job = {"app.kubernetes.io/part-of": "llmp", "app.kubernetes.io/component": "training-job", "llmp.dev/job-id": "j"}
    allowed = [
        (None, "gateway", 8000),
        (None, "gateway", 50050),
        ("gateway", "tokenizer", 50051),
        ("gateway", "retrieval", 50052),
        ("gateway", "training", 50053),
        ("gateway", "inference", 50054),
        ("gateway", "redis", 6379),
        ("training", "tokenizer", 50051),
        ("training", "redis", 6379),
        ("retrieval", "qdrant", 6333),
        ("inference", "inference-worker", 6379),
        ("inference-worker", "inference", 6379),
        ("job", "redis", 6379),
        ("job", "tokenizer", 50051),
        ("test", "gateway", 8000),
    ]
    denied = [
        (None, "tokenizer", 50051),
        (None, "inference", 8265),
        (None, "redis", 6379),
        (None, "qdrant", 6333),
        ("gateway", "inference", 8265),
        ("gateway", "qdrant", 6333),
        ("tokenizer", "redis", 6379),
        ("tokenizer", "gateway", 8000),
        ("retrieval", "redis", 6379),
        ("job", "qdrant", 6333),
        ("job", "inference", 8265),
        ("test", "tokenizer", 50051),
        ("qdrant", "retrieval", 50052),
    ]
    labels = pod | {"job": job}
    for src, dst, port in allowed:
        assert reachable(policies, labels.get(src) if src else None, labels[dst], port), f"{src} -> {dst}:{port}"
    for src, dst, port in denied:
        assert not reachable(policies, labels.get(src) if src else None, labels[dst], port), f"{src} -> {dst}:{port}"


def test_every_llmp_variable_the_chart_sets_is_declared(rendered: list[Manifest]) -> None:
    """The pods read only variables that libs.common.settings declares (the gateway's once it is
    installed); LLMP_REDIS_PASSWORD is the chart's own, expanded into LLMP_REDIS_URL by Kubernetes."""
    import importlib.util

    from libs.common.settings import VARIABLES

    gateway_here = importlib.util.find_spec("services.gateway") is not None
    names = {e["name"] for _, t in all_pods(rendered) for c in containers(t) for e in c.get("env", [])}
    llmp = {n for n in names if n.startswith("LLMP_")} - {"LLMP_REDIS_PASSWORD"}
    undeclared = {n for n in llmp - set(VARIABLES) if gateway_here or not n.startswith("LLMP_GATEWAY_")}
    assert undeclared == set()
    assert {"LLMP_TRAINING_KUBERAY_IMAGE", "LLMP_TRAINING_KUBERAY_SECRET", "LLMP_QDRANT_URL"} <= llmp


def test_images_come_from_the_registry_and_tag_the_values_name() -> None:
    objects = render({"image": {"registry": "registry.example/ml", "tag": "1.2.3", "pullSecrets": ["regcred"]}})
    llmp_pods = [(w, t) for w, t in all_pods(objects) if not w.startswith("StatefulSet/")]
    assert llmp_pods
    for where, template in llmp_pods:
        assert template["spec"]["imagePullSecrets"] == [{"name": "regcred"}], where
        for c in template["spec"]["containers"]:
            assert re.fullmatch(r"registry\.example/ml/llmp-[a-z]+:1\.2\.3", c["image"]), (where, c["image"])
    (training,) = find(objects, "Deployment", "llmp-training")
    env = env_of(training["spec"]["template"]["spec"]["containers"][0])
    assert env["LLMP_TRAINING_KUBERAY_IMAGE"] == "registry.example/ml/llmp-training:1.2.3"
