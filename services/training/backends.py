"""Where jobs run: an explicit table of backends, chosen by LLMP_TRAINING_BACKEND.

- `local_ray` (default): the service joins a Ray (RAY_ADDRESS, else a local one it starts) and
  drives each job from a thread of its own process; Ray Train runs the workers. A job's driver
  lives and dies with the service, so on a restart the service finds its RUNNING jobs gone and
  resumes them from their last checkpoint (see TrainingCore.reconcile).
- `kuberay`: each job is a KubeRay RayJob created with the `kubernetes` client; its driver runs
  `python -m services.training.runner` in the RayJob's own Ray cluster, sharing Redis and the
  artifact store (a PersistentVolumeClaim) with the service.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from typing import Any

from libs.common.settings import env
from services.training.config import TrainingConfig
from services.training.jobs import JobContext
from services.training.jobstore import CANCEL, PREEMPT, JobRecord
from services.training.runner import run_job

log = logging.getLogger(__name__)

LOCAL_DASHBOARD_PORT = 8265
RAY_START_ATTEMPTS = 2


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

    def open(self) -> None:
        """Join Ray before serving any call: Ray forks its processes, which is unsafe under busy gRPC threads."""
        import ray

        address = os.environ.get("RAY_ADDRESS")
        local: dict[str, Any] = {
            "num_cpus": self.config.ray_num_cpus or None,
            "include_dashboard": self.config.ray_dashboard,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": LOCAL_DASHBOARD_PORT,
        }
        for attempt in range(1, RAY_START_ATTEMPTS + 1):
            try:
                # "local": a new Ray of our own, never another process's that happens to run here
                ray.init(address=address or "local", **({} if address else local))
                break
            except Exception:  # a local raylet has a fixed 30 s to register, which a busy machine can miss
                ray.shutdown()
                if attempt == RAY_START_ATTEMPTS:
                    raise
                log.warning("Ray did not start (attempt %d of %d); trying again", attempt, RAY_START_ATTEMPTS)
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


BACKENDS: dict[str, type[Backend]] = {"local_ray": LocalRayBackend, "kuberay": KubeRayBackend}


def rayjob_name(job_id: str) -> str:
    return f"llmp-{job_id}".lower()


def rayjob_manifest(job: JobRecord, config: TrainingConfig, redis_url: str) -> dict[str, Any]:
    """The RayJob that runs `job`: a head running the driver and `num_workers` one-CPU workers."""
    workers = int(job.config.get("num_workers", 1))
    home = "/var/lib/llmp"
    container_env = [
        {"name": "LLMP_HOME", "value": home},
        {"name": "LLMP_REDIS_URL", "value": redis_url},
        {"name": "LLMP_TOKENIZER_ADDRESS", "value": env("LLMP_TOKENIZER_ADDRESS")},
    ]
    memory = f"{int(config.worker_memory_gb * 1024)}Mi"

    def pod(name: str, cpu: str) -> dict[str, Any]:
        return {
            "spec": {
                "containers": [
                    {
                        "name": name,
                        "image": config.kuberay_image,
                        "env": container_env,
                        "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory}},
                        "volumeMounts": [{"name": "artifacts", "mountPath": home}],
                    }
                ],
                "volumes": [
                    {"name": "artifacts", "persistentVolumeClaim": {"claimName": config.kuberay_artifacts_claim}}
                ],
            }
        }

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
            "rayClusterSpec": {
                "headGroupSpec": {"rayStartParams": {"num-cpus": "0"}, "template": pod("ray-head", "1")},
                "workerGroupSpecs": [
                    {
                        "groupName": "workers",
                        "replicas": workers,
                        "minReplicas": workers,
                        "maxReplicas": workers,
                        "rayStartParams": {"num-cpus": "1"},
                        "template": pod("ray-worker", "1"),
                    }
                ],
            },
        },
    }
