"""Settings of the inference service (section `inference` of the config file, LLMP_INFERENCE_*)."""

from __future__ import annotations

from dataclasses import dataclass

from libs.common.config import ServiceConfig, doc


@dataclass
class InferenceConfig(ServiceConfig):
    port: int = doc("gRPC port", 50054)
    metrics_port: int = doc("Prometheus port; -1 turns metrics off", 51054)
    backend: str = doc("'ray' (a Ray Serve deployment per model) or 'local' (in-process, no Ray)", "ray")
    ray_num_cpus: int = doc("CPUs of the local Ray this service starts; 0: all (ignored with RAY_ADDRESS)", 0)
    dashboard: bool = doc("start the local Ray with its dashboard on 127.0.0.1", True)
    dashboard_port: int = doc("port of the local Ray dashboard", 8265)
    max_tokens: int = doc("cap on a request's max_tokens", 4096)
    max_n: int = doc("cap on a request's n (completions per prompt)", 16)
