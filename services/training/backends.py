"""Where jobs run: an explicit table of backends, chosen by LLMP_TRAINING_BACKEND.

- `local_ray` (default): the service joins a Ray (RAY_ADDRESS, else a local one it starts) and
  drives each job from a thread of its own process; Ray Train runs the workers. A job's driver
  lives and dies with the service, so on a restart the service finds its RUNNING jobs gone and
  resumes them from their last checkpoint (see TrainingCore.reconcile).
- `ray_jobs`: each job's driver (`python -m services.training.runner`) is submitted through Ray's
  job submission API to a Ray cluster's job server (LLMP_TRAINING_RAY_JOBS_ADDRESS). The driver
  runs in the cluster and outlives the service, sharing Redis, the artifact store and the
  tokeniser service with it through the environment handed over with the submission.
- `kuberay`: each job is a KubeRay RayJob created with the `kubernetes` client; its driver runs
  `python -m services.training.runner` in the RayJob's own Ray cluster, sharing Redis and the
  artifact store (a PersistentVolumeClaim) with the service.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from libs.common import secrets
from libs.common.errors import FailedPrecondition, Unavailable
from libs.common.local_ray import remove_ray_temp_dir, start_local_ray
from libs.common.settings import env as env_value
from services.training.config import TrainingConfig
from services.training.jobs import JobContext
from services.training.jobstore import CANCEL, FAILED, PREEMPT, JobRecord
from services.training.runner import run_job

log = logging.getLogger(__name__)

LOCAL_DASHBOARD_PORT = 8265
SUBMIT_RETRY_SECONDS = 180  # a job server's agent can take minutes to come up on a busy machine


class Backend(ABC):
    def __init__(self, config: TrainingConfig, context: JobContext) -> None:
        self.config = config
        self.context = context

    @abstractmethod
    def open(self) -> None:
        """Connect to what runs the jobs (called once, while the service reports NOT_SERVING)."""

    @abstractmethod
    def start(self, job: JobRecord) -> None:
        """Start driving a PENDING job; returns at once."""

    @abstractmethod
    def alive(self, job: JobRecord) -> bool:
        """Whether the job's driver still exists (False: it was lost, e.g. with a restarted service)."""

    @abstractmethod
    def drain(self, timeout: float) -> None:
        """The service is stopping: leave jobs in a state they can resume from."""


class LocalRayBackend(Backend):
    def __init__(self, config: TrainingConfig, context: JobContext) -> None:
        super().__init__(config, context)
        self._drivers: dict[str, threading.Thread] = {}
        self._own_ray_home: Path | None = None  # LLMP_HOME of the local Ray this process started

    def open(self) -> None:
        """Join Ray before serving any call: Ray forks its processes, which is unsafe under busy gRPC threads."""
        address = os.environ.get("RAY_ADDRESS")
        if address:
            import ray

            ray.init(address=address)
        else:
            # its own Ray, as secure as the stack's: token authentication with the token of
            # $LLMP_HOME/secrets (never ~/.ray), loopback only, its session folders under LLMP_HOME
            self._own_ray_home = self.context.artifacts.root.parent
            start_local_ray(
                self._own_ray_home,
                num_cpus=self.config.ray_num_cpus or None,
                include_dashboard=self.config.ray_dashboard,
                dashboard_host="127.0.0.1",
                dashboard_port=LOCAL_DASHBOARD_PORT,
            )
        import ray

        if not address:  # Ray Train code in this process finds the cluster by RAY_ADDRESS (announce_local_gcs_port)
            os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        log.info("connected to Ray at %s", ray.get_runtime_context().gcs_address)

    def start(self, job: JobRecord) -> None:
        driver = threading.Thread(target=run_job, args=(job.job_id, self.context), name=job.job_id, daemon=True)
        self._drivers[job.job_id] = driver
        driver.start()

    def alive(self, job: JobRecord) -> bool:
        driver = self._drivers.get(job.job_id)
        return driver is not None and driver.is_alive()

    def drain(self, timeout: float) -> None:
        """Ask running jobs to checkpoint and stop, wait for them, then leave Ray."""
        import ray

        running = {job_id: t for job_id, t in self._drivers.items() if t.is_alive()}
        store = self.context.store
        for job_id in running:
            if store.stop_requested(job_id) != CANCEL:
                store.request_stop(job_id, PREEMPT)
        end = time.monotonic() + timeout
        for driver in running.values():
            driver.join(max(0.0, end - time.monotonic()))
        ray.shutdown()
        if self._own_ray_home is not None:
            remove_ray_temp_dir(self._own_ray_home)


class RayJobsBackend(Backend):
    """Drivers submitted with Ray's JobSubmissionClient; a job's Ray submissions are found by metadata."""

    METADATA_KEY = "llmp_job_id"

    def __init__(self, config: TrainingConfig, context: JobContext) -> None:
        super().__init__(config, context)
        self._submitters: dict[str, threading.Thread] = {}

    def open(self) -> None:
        from ray.job_submission import JobSubmissionClient

        address = self.config.ray_jobs_address
        try:
            self.client = JobSubmissionClient(address)
        except ConnectionError as e:  # the service cannot run a job without it: say where it looked
            raise Unavailable(f"no Ray job server at {address}: {e}", field="ray_jobs_address") from e

    def start(self, job: JobRecord) -> None:
        """Submit from a thread of its own: a job server just started refuses for a while (see _submit)."""
        submitter = threading.Thread(target=self._submit, args=(job,), name=f"submit-{job.job_id}", daemon=True)
        self._submitters[job.job_id] = submitter
        submitter.start()

    def _submit(self, job: JobRecord) -> None:
        """Submit the driver, retrying while the job server has no agent yet ("No available agent")."""
        submission_id = f"{rayjob_name(job.job_id)}-{job.attempts + 1}-{int(time.time())}"
        end, delay = time.monotonic() + SUBMIT_RETRY_SECONDS, 0.5
        while True:
            try:
                self.client.submit_job(
                    entrypoint=f"{sys.executable} -m services.training.runner --job-id {job.job_id}",
                    submission_id=submission_id,
                    metadata={self.METADATA_KEY: job.job_id},
                    runtime_env={"env_vars": driver_env(self.context)},
                )
                break
            except Exception as e:
                if "No available agent" in str(e) and time.monotonic() < end:
                    time.sleep(delay)
                    delay = min(2 * delay, 5.0)
                    continue
                log.exception("job %s could not be submitted", job.job_id)
                with contextlib.suppress(FailedPrecondition):  # e.g. cancelled meanwhile
                    self.context.store.transition(
                        job.job_id, FAILED, reason=f"the ray_jobs backend could not start it: {e}"
                    )
                return
        log.info("job %s submitted to %s as %s", job.job_id, self.config.ray_jobs_address, submission_id)

    def alive(self, job: JobRecord) -> bool:
        """True while any submission of the job is still pending or running on the cluster."""
        from ray.job_submission import JobStatus

        submitter = self._submitters.get(job.job_id)
        if submitter is not None and submitter.is_alive():
            return True
        return any(
            (info.metadata or {}).get(self.METADATA_KEY) == job.job_id
            and info.status in (JobStatus.PENDING, JobStatus.RUNNING)
            for info in self.client.list_jobs()
        )

    def drain(self, timeout: float) -> None:
        """Nothing to do: the drivers run in the cluster and carry on without the service."""


def driver_env(context: JobContext) -> dict[str, str]:
    """What a driver running outside the service needs to reach the platform's shared parts.

    Ray's dashboard shows a job's environment: the local Redis' password is left out (redacted) and
    read by the driver from the LLMP_HOME it shares (secrets.redis_url); a Redis of another's keeps
    its URL as given."""
    home = context.artifacts.root.parent
    url = context.redis_url
    local = secrets.read(home, secrets.REDIS_PASSWORD)
    if local is not None and urlsplit(url).password == local:
        url = secrets.redact(url)
    shared = {"LLMP_REDIS_URL": url, "LLMP_HOME": str(home)}
    names = ("LLMP_TOKENIZER_ADDRESS", "RAY_AUTH_MODE")
    return shared | {name: os.environ[name] for name in names if os.environ.get(name)}


class KubeRayBackend(Backend):
    GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"

    def open(self) -> None:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        self.api = client.CustomObjectsApi()

    def start(self, job: JobRecord) -> None:
        manifest = rayjob_manifest(job, self.config, self.context.redis_url)
        self.api.create_namespaced_custom_object(
            self.GROUP, self.VERSION, self.config.kuberay_namespace, self.PLURAL, manifest
        )

    def alive(self, job: JobRecord) -> bool:
        from kubernetes.client.exceptions import ApiException

        try:
            found: Any = self.api.get_namespaced_custom_object(
                self.GROUP, self.VERSION, self.config.kuberay_namespace, self.PLURAL, rayjob_name(job.job_id)
            )
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        return found.get("status", {}).get("jobDeploymentStatus") not in ("Complete", "Failed")

    def drain(self, timeout: float) -> None:
        """Nothing to do: RayJobs run in the cluster, not in this process, and carry on without it."""


BACKENDS: dict[str, type[Backend]] = {
    "local_ray": LocalRayBackend,
    "ray_jobs": RayJobsBackend,
    "kuberay": KubeRayBackend,
}


def rayjob_name(job_id: str) -> str:
    return f"llmp-{job_id}".lower()


HOME = "/var/lib/llmp"
"""Where the RayJob pods mount the artifact claim (LLMP_HOME; the store is artifacts/ below it)."""
JOB_POD_LABELS = {"app.kubernetes.io/part-of": "llmp", "app.kubernetes.io/component": "training-job"}
"""Labels of every RayJob pod: the chart's NetworkPolicies select them by these."""
RAY_TOKEN_KEY = "auth_token"
"""The key of Ray's token in the Secret: KubeRay's own (authOptions.secretName reads it there too)."""
RESTRICTED_POD = {
    "runAsNonRoot": True,
    "runAsUser": 10001,
    "runAsGroup": 10001,
    "fsGroup": 10001,
    "seccompProfile": {"type": "RuntimeDefault"},
}
RESTRICTED_CONTAINER = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "privileged": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def job_env(config: TrainingConfig, redis_url: str) -> list[dict[str, Any]]:
    """The RayJob pods' environment. With kuberay_secret, the Redis password and Ray's token come from
    that Secret (the RayJob object never holds them) and the pods' Ray runs with token authentication."""
    env: list[dict[str, Any]] = [
        {"name": "LLMP_HOME", "value": HOME},
        {"name": "LLMP_TOKENIZER_ADDRESS", "value": env_value("LLMP_TOKENIZER_ADDRESS")},
        {"name": "HOME", "value": "/tmp"},
    ]
    if not config.kuberay_secret:
        return [*env, {"name": "LLMP_REDIS_URL", "value": redis_url}]

    def secret(name: str, key: str) -> dict[str, Any]:
        return {"name": name, "valueFrom": {"secretKeyRef": {"name": config.kuberay_secret, "key": key}}}

    url = urlsplit(redis_url)
    if url.password is not None:  # Kubernetes expands $(VAR) from the variables listed before it
        netloc = f"{url.username or ''}:$(LLMP_REDIS_PASSWORD)@{url.hostname}" + (f":{url.port}" if url.port else "")
        redis_url = urlunsplit(url._replace(netloc=netloc))
    return [
        *env,
        secret("LLMP_REDIS_PASSWORD", "redis-password"),
        {"name": "LLMP_REDIS_URL", "value": redis_url},
        {"name": "RAY_AUTH_MODE", "value": "token"},
        secret("RAY_AUTH_TOKEN", RAY_TOKEN_KEY),
    ]


def rayjob_manifest(job: JobRecord, config: TrainingConfig, redis_url: str) -> dict[str, Any]:
    """The RayJob that runs `job`: a head running the driver and `num_workers` one-CPU workers, each pod
    non-root with a read-only root filesystem (writable /tmp and /dev/shm), labelled for the NetworkPolicies."""
    workers = int(job.config.get("num_workers", 1))
    gpus = config.worker_gpus if job.config.get("use_gpu") else 0
    container_env = job_env(config, redis_url)
    job_memory = f"{int(config.worker_memory_gb * 1024)}Mi"
    labels = {**JOB_POD_LABELS, "llmp.dev/job-id": job.job_id}

    def pod(name: str, cpu: str, memory: str, gpus: int = 0, mounts: bool = True) -> dict[str, Any]:
        """`cpu` is the request; every pod may burst to one CPU (Ray's num-cpus says what it schedules)."""
        limits = {"cpu": "1", "memory": memory} | ({"nvidia.com/gpu": str(gpus)} if gpus else {})
        container: dict[str, Any] = {
            "name": name,
            "image": config.kuberay_image,
            "env": container_env,
            "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": limits},
            "securityContext": RESTRICTED_CONTAINER,
            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        }
        volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
        if mounts:
            container["volumeMounts"] += [
                {"name": "artifacts", "mountPath": HOME},
                {"name": "shm", "mountPath": "/dev/shm"},
            ]
            volumes += [
                {"name": "artifacts", "persistentVolumeClaim": {"claimName": config.kuberay_artifacts_claim}},
                {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": memory}},  # Ray's object store
            ]
        spec = {
            "automountServiceAccountToken": False,
            "securityContext": RESTRICTED_POD,
            "containers": [container],
            "volumes": volumes,
        }
        return {"metadata": {"labels": labels}, "spec": spec}

    # KubeRay's submitter Job pod (it runs `ray job submit` against the head): labelled and restricted
    # like the rest, and without the artifact claim it does not need
    submitter = pod("ray-job-submitter", "100m", "256Mi", mounts=False)
    submitter["spec"]["restartPolicy"] = "Never"
    # with the Secret, KubeRay itself authenticates to the job's Ray (status, logs) with its token
    auth = {"authOptions": {"mode": "token", "secretName": config.kuberay_secret}} if config.kuberay_secret else {}
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "name": rayjob_name(job.job_id),
            "namespace": config.kuberay_namespace,
            "labels": {"app.kubernetes.io/managed-by": "llmp", "llmp.dev/job-id": job.job_id},
        },
        "spec": {
            "entrypoint": f"python -m services.training.runner --job-id {job.job_id}",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            "backoffLimit": 0,
            "submitterPodTemplate": submitter,
            "rayClusterSpec": {
                **auth,
                # the submitter pod reaches the head's job API on the pod network (NetworkPolicy: job pods only)
                "headGroupSpec": {
                    "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                    "template": pod("ray-head", "250m", job_memory),
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "workers",
                        "replicas": workers,
                        "minReplicas": workers,
                        "maxReplicas": workers,
                        "rayStartParams": {"num-cpus": "1"} | ({"num-gpus": str(gpus)} if gpus else {}),
                        "template": pod("ray-worker", "1", job_memory, gpus),
                    }
                ],
            },
        },
    }
