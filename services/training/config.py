"""Settings of the training service (section `training` of the config file, LLMP_TRAINING_*)."""

from __future__ import annotations

from dataclasses import dataclass

from libs.common.config import ServiceConfig, doc


@dataclass
class TrainingConfig(ServiceConfig):
    port: int = doc("gRPC port", 50053)
    metrics_port: int = doc("Prometheus port; -1 turns metrics off", 51053)
    backend: str = doc("where jobs run: local_ray (RAY_ADDRESS or a local Ray), ray_jobs or kuberay", "local_ray")
    ray_num_cpus: int = doc("CPUs of the local Ray started by the service; 0: all", 0)
    ray_dashboard: bool = doc("start the Ray dashboard (127.0.0.1:8265) with the local Ray", True)
    worker_memory_gb: float = doc("memory one training worker may use; larger jobs are refused", 8.0)
    worker_gpus: int = doc("GPUs one training worker gets where jobs ask for them (use_gpu); 0: none", 0)
    max_attempts: int = doc("starts of a job (first run plus resumes after a lost Ray job)", 3)
    max_workers: int = doc("most Ray Train workers (num_workers) one job may ask for", 16)
    max_config_bytes: int = doc("largest job config (as JSON) a submission may carry", 64 << 10)
    kuberay_namespace: str = doc("namespace of the RayJobs the kuberay backend creates", "llmp")
    kuberay_image: str = doc("container image of the RayJob pods", "llmp:latest")
    kuberay_artifacts_claim: str = doc("PersistentVolumeClaim holding the artifact store", "llmp-artifacts")
    kuberay_secret: str = doc(
        "Secret with the Redis password (redis-password) and Ray's token (auth_token) for the RayJob pods; empty: none",
        "",
    )
    ray_jobs_address: str = doc(
        "Ray dashboard (job server) URL the ray_jobs backend submits to", "http://127.0.0.1:8265"
    )
