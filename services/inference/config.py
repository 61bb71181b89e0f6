"""Settings of the inference service (section `inference` of the config file, LLMP_INFERENCE_*)."""

from __future__ import annotations

from dataclasses import dataclass

from libs.common.config import ServiceConfig, doc


@dataclass
class InferenceConfig(ServiceConfig):
    port: int = doc("gRPC port", 50054)
    metrics_port: int = doc("Prometheus port; -1 turns metrics off", 51054)
    backend: str = doc(
        "'ray' (a Ray Serve deployment per model), 'local' (in-process, no Ray) or an llmp.engines plugin", "ray"
    )
    ray_num_cpus: int = doc("CPUs of the local Ray this service starts; 0: all (ignored with RAY_ADDRESS)", 0)
    dashboard: bool = doc("start the local Ray with its dashboard on 127.0.0.1", True)
    dashboard_port: int = doc("port of the local Ray dashboard", 8265)
    cpu_preload: bool = doc(
        "engine processes (this one with the local backend, Serve replicas) run with tcmalloc and Intel's "
        "OpenMP preloaded where found (services/inference/runtime.py)",
        True,
    )
    stream_messages_per_second: float = doc(
        "streamed chunks one replica sends per second at most, over all its streams; each carries the "
        "tokens generated since the last (first and last chunks go at once); 0: one per engine step",
        200.0,
    )
    gather_requests: int = doc(
        "with the ray backend, requests for one model that arrive together go to a replica in one call, "
        "this many at most (each call costs the front milliseconds of CPU); Serve's max_ongoing_requests "
        "and autoscaling then count calls; 1: a call per request",
        32,
    )
    engine_process: bool = doc(
        "with the ray backend, a replica runs its engine in a child process, where Ray's and Serve's threads "
        "do not take the engine's GIL (services/inference/engine_process.py); false: in the replica's own",
        True,
    )
    max_tokens: int = doc("cap on a request's max_tokens", 4096)
    max_n: int = doc("cap on a request's n (completions per prompt)", 16)
    max_replicas: int = doc("cap on a model's replicas.max_replicas", 8)
    max_replica_cpus: float = doc("cap on a replica's num_cpus", 16.0)
    max_replica_gpus: float = doc("cap on a replica's num_gpus", 8.0)
    max_replica_memory_bytes: int = doc("cap on a replica's memory_bytes and its weights + KV cache", 64 << 30)
    max_ongoing_requests: int = doc("cap on a replica's max_ongoing_requests and max_queued_requests", 1024)
    max_kv_cache_bytes: int = doc("cap on a replica's engine.kv_cache_bytes", 32 << 30)
    max_num_seqs: int = doc("cap on a replica's engine.max_num_seqs", 1024)
    max_num_batched_tokens: int = doc("cap on a replica's engine.max_num_batched_tokens", 16384)
    max_draft_tokens: int = doc("cap on the tokens a drafter proposes per step (engine.speculative num_tokens)", 16)
    deploy_timeout_seconds: float = doc("LoadModel gives up (and removes the deployment) after this long", 900.0)
    managed_models: str = doc(
        "JSON list of models deployed by the cluster's Serve config (the chart's RayService), each as its "
        "build_app args {name, path, replicas, engine}: served under their names, never loaded or unloaded "
        "here; set (even to []), Serve is the cluster's and this service does not start it; empty: its own",
        "",
    )
