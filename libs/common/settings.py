"""Every variable a user can set, declared once.

Service configs map their fields to these names by convention: a field `f` of the shared
config is `LLMP_F`, and of a service `s` is `LLMP_S_F` (both upper-cased). A unit test keeps this
table and the config dataclasses in step; `llmp config vars` prints it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class EnvVar:
    name: str
    default: str
    doc: str


def _service_vars(service: str, port: int, extra: list[EnvVar] | None = None) -> list[EnvVar]:
    s = service.upper()
    return [
        EnvVar(f"LLMP_{s}_HOST", "127.0.0.1", f"interface the {service} gRPC server binds to"),
        EnvVar(f"LLMP_{s}_PORT", str(port), f"{service} gRPC port"),
        EnvVar(f"LLMP_{s}_ADDRESS", f"127.0.0.1:{port}", f"where clients reach the {service} service"),
        EnvVar(f"LLMP_{s}_METRICS_PORT", str(port + 1000), f"{service} Prometheus metrics port (-1: off)"),
        EnvVar(f"LLMP_{s}_MAX_MESSAGE_BYTES", str(64 << 20), f"largest gRPC message {service} sends or accepts"),
        EnvVar(f"LLMP_{s}_MAX_CONCURRENT_RPCS", "256", f"{service} calls served at once; more are refused"),
        EnvVar(f"LLMP_{s}_MAX_SLOW_CALLS", "32", f"{service} slow calls (watches, reports, imports) served at once"),
        EnvVar(f"LLMP_{s}_DRAIN_SECONDS", "30", f"grace period for in-flight {service} work on SIGTERM"),
        *(extra or []),
    ]


VARIABLES: dict[str, EnvVar] = {
    v.name: v
    for v in [
        EnvVar("LLMP_HOME", "~/.llmp", "local state, logs and the artifact store (artifacts/ below it)"),
        EnvVar("LLMP_CONFIG", "", "YAML config file: a `common:` section and one section per service"),
        EnvVar("LLMP_LOG_LEVEL", "INFO", "log level: DEBUG, INFO, WARNING, ERROR"),
        EnvVar("LLMP_LOG_FORMAT", "json", "log format: json (one object per line) or text"),
        EnvVar("LLMP_REDIS_URL", "", "Redis server to use; empty: `llmp up` starts a local one"),
        EnvVar("LLMP_REDIS_PORT", "6379", "port of the Redis that `llmp up` starts"),
        EnvVar("LLMP_RAY_PORT", "6380", "GCS port of the Ray head that `llmp up` starts (unless RAY_ADDRESS is set)"),
        EnvVar("LLMP_RAY_DASHBOARD_PORT", "8265", "port of Ray's dashboard, on 127.0.0.1"),
        EnvVar("LLMP_QDRANT_URL", "", "Qdrant server to use; empty: embedded Qdrant under LLMP_HOME"),
        EnvVar(
            "LLMP_PLUGINS_ALLOW", "", "comma-separated third-party plugins allowed (`kind:name` or `name`); empty: all"
        ),
        *_service_vars(
            "gateway",
            50050,
            [
                EnvVar("LLMP_GATEWAY_HTTP_PORT", "8000", "gateway HTTP port (OpenAI-compatible /v1, platform /api/v1)"),
                EnvVar("LLMP_GATEWAY_ADMIN_KEY", "", "an admin API key to register at start (e.g. from a k8s Secret)"),
                EnvVar("LLMP_GATEWAY_MAX_BODY_BYTES", str(8 << 20), "largest HTTP request body the gateway reads"),
                EnvVar("LLMP_GATEWAY_MAX_IN_FLIGHT", "256", "requests one gateway serves at once; more get 429"),
                EnvVar("LLMP_GATEWAY_REQUEST_TIMEOUT", "600", "seconds a request may take; the backends' deadline"),
                EnvVar("LLMP_GATEWAY_REQUESTS_PER_MINUTE", "600", "default per-key request rate (0: unlimited)"),
                EnvVar("LLMP_GATEWAY_TOKENS_PER_MINUTE", "200000", "default per-key token quota (0: unlimited)"),
                EnvVar("LLMP_API_KEY", "", "API key the `llmp` command line sends (else $LLMP_HOME/secrets/admin.key)"),
                EnvVar("LLMP_GATEWAY_URL", "", "gRPC address `llmp --gateway` sends every command to"),
            ],
        ),
        *_service_vars(
            "tokenizer",
            50051,
            [
                EnvVar("LLMP_TOKENIZER_MAX_BATCH", "4096", "most texts or sequences in one batched call"),
                EnvVar("LLMP_TOKENIZER_MAX_TEXT_BYTES", str(16 << 20), "largest single text to encode"),
                EnvVar("LLMP_TOKENIZER_CACHE_SIZE", "16", "tokenisers kept loaded in memory"),
                EnvVar("LLMP_TOKENIZER_MAX_TRAINING_JOBS", "2", "training jobs that run at once"),
                EnvVar("LLMP_TOKENIZER_IMPORT_ROOTS", "", "folders Import may read absolute paths from (a,b)"),
                EnvVar("LLMP_TOKENIZER_MAX_IMPORT_BYTES", str(64 << 20), "largest file Import reads or accepts"),
                EnvVar("LLMP_TOKENIZER_MAX_CHAT_TEMPLATE_CHARS", "65536", "longest chat template"),
                EnvVar("LLMP_TOKENIZER_CHAT_RENDER_SECONDS", "2", "longest a chat template may render"),
                EnvVar("LLMP_TOKENIZER_MAX_OUTPUT_TOKENS", str(1 << 22), "most token ids one encode call returns"),
                EnvVar("LLMP_TOKENIZER_MAX_OVERFLOW_WINDOWS", "65536", "most overflow windows one encode call makes"),
                EnvVar("LLMP_TOKENIZER_MAX_REPORT_BYTES", str(256 << 20), "most bytes a vocabulary report trains on"),
            ],
        ),
        *_service_vars(
            "retrieval",
            50052,
            [
                EnvVar("LLMP_RETRIEVAL_MAX_BATCH", "1024", "most texts in one Embed call or documents in one Ingest"),
                EnvVar("LLMP_RETRIEVAL_MAX_DOCUMENT_BYTES", str(8 << 20), "largest single document (UTF-8 bytes)"),
                EnvVar("LLMP_RETRIEVAL_MAX_TOP_K", "1000", "most hits one search returns"),
                EnvVar("LLMP_RETRIEVAL_EMBEDDER_CACHE", "4", "embedders kept loaded in memory"),
                EnvVar("LLMP_RETRIEVAL_MAX_CHUNK_TOKENS", "8192", "largest chunk size a chunker spec may ask for"),
                EnvVar("LLMP_RETRIEVAL_MAX_CHUNKS_PER_DOCUMENT", "4096", "most chunks one document is split into"),
                EnvVar("LLMP_RETRIEVAL_MAX_INGEST_CHUNKS", "16384", "most chunks one Ingest call embeds"),
                EnvVar("LLMP_RETRIEVAL_MAX_MMR_CANDIDATES", "1000", "most hits a search reranks with MMR"),
                EnvVar("LLMP_RETRIEVAL_INGEST_BATCH", "64", "documents chunked and embedded together"),
                EnvVar("LLMP_RETRIEVAL_MAX_CORPUS_DOCUMENTS", "1000000", "most documents one corpus ingest takes"),
                EnvVar(
                    "LLMP_RETRIEVAL_RAY", "auto", "Ray for corpus ingests: auto (join RAY_ADDRESS when set), local, off"
                ),
                EnvVar("LLMP_RETRIEVAL_RAY_MIN_DOCUMENTS", "2000", "corpus size for Ray Data in 'auto'"),
                EnvVar("LLMP_RETRIEVAL_RAY_WORKERS", "2", "most Ray Data actors chunking and embedding one corpus"),
                EnvVar(
                    "LLMP_RETRIEVAL_FAULT_POINT",
                    "",
                    "test hook: the process kills itself at this ingest step (after_journal, after_upsert)",
                ),
                EnvVar(
                    "LLMP_RETRIEVAL_VECTORSTORE",
                    "qdrant_edge",
                    "embedded store without LLMP_QDRANT_URL: qdrant_edge, or qdrant (qdrant-client's local mode)",
                ),
                EnvVar("LLMP_RETRIEVAL_INDEX_THRESHOLD_KB", "10000", "vectors written (KiB) that start an HNSW build"),
            ],
        ),
        *_service_vars(
            "training",
            50053,
            [
                EnvVar("LLMP_TRAINING_BACKEND", "local_ray", "where jobs run: local_ray, ray_jobs or kuberay"),
                EnvVar("LLMP_TRAINING_RAY_NUM_CPUS", "0", "CPUs of the local Ray the service starts; 0: all"),
                EnvVar("LLMP_TRAINING_RAY_DASHBOARD", "true", "start the Ray dashboard with the local Ray"),
                EnvVar("LLMP_TRAINING_WORKER_MEMORY_GB", "8", "memory one training worker may use"),
                EnvVar("LLMP_TRAINING_WORKER_GPUS", "0", "GPUs of a training worker (use_gpu jobs); 0: none"),
                EnvVar("LLMP_TRAINING_MAX_ATTEMPTS", "3", "starts of a job, resumes after a lost Ray job included"),
                EnvVar("LLMP_TRAINING_MAX_WORKERS", "16", "most Ray Train workers (num_workers) one job may ask for"),
                EnvVar("LLMP_TRAINING_MAX_CONFIG_BYTES", str(64 << 10), "largest job config (as JSON) submitted"),
                EnvVar("LLMP_TRAINING_KUBERAY_NAMESPACE", "llmp", "namespace of the RayJobs of the kuberay backend"),
                EnvVar("LLMP_TRAINING_KUBERAY_IMAGE", "llmp:latest", "container image of the RayJob pods"),
                EnvVar("LLMP_TRAINING_KUBERAY_ARTIFACTS_CLAIM", "llmp-artifacts", "PVC holding the artifact store"),
                EnvVar(
                    "LLMP_TRAINING_KUBERAY_SECRET",
                    "",
                    "Secret the RayJob pods read the Redis password (redis-password) and Ray's token (auth_token) from",
                ),
                EnvVar(
                    "LLMP_TRAINING_RAY_JOBS_ADDRESS",
                    "http://127.0.0.1:8265",
                    "Ray job server (dashboard) URL of the ray_jobs backend",
                ),
            ],
        ),
        *_service_vars(
            "inference",
            50054,
            [
                EnvVar("LLMP_INFERENCE_BACKEND", "ray", "'ray' (a Ray Serve deployment per model) or 'local' (no Ray)"),
                EnvVar("LLMP_INFERENCE_RAY_NUM_CPUS", "0", "CPUs of the local Ray it starts; 0: all"),
                EnvVar("LLMP_INFERENCE_DASHBOARD", "true", "start the local Ray with its dashboard on 127.0.0.1"),
                EnvVar("LLMP_INFERENCE_DASHBOARD_PORT", "8265", "port of the local Ray dashboard"),
                EnvVar("LLMP_INFERENCE_MAX_TOKENS", "4096", "cap on a request's max_tokens"),
                EnvVar("LLMP_INFERENCE_MAX_N", "16", "cap on a request's n (completions per prompt)"),
                EnvVar("LLMP_INFERENCE_MAX_REPLICAS", "8", "cap on a model's replicas.max_replicas"),
                EnvVar("LLMP_INFERENCE_MAX_REPLICA_CPUS", "16.0", "cap on a replica's num_cpus"),
                EnvVar("LLMP_INFERENCE_MAX_REPLICA_GPUS", "8.0", "cap on a replica's num_gpus"),
                EnvVar(
                    "LLMP_INFERENCE_MAX_REPLICA_MEMORY_BYTES",
                    str(64 << 30),
                    "cap on a replica's memory_bytes and its weights + KV cache",
                ),
                EnvVar(
                    "LLMP_INFERENCE_MAX_ONGOING_REQUESTS",
                    "1024",
                    "cap on a replica's max_ongoing_requests and max_queued_requests",
                ),
                EnvVar("LLMP_INFERENCE_MAX_KV_CACHE_BYTES", str(32 << 30), "cap on a replica's engine.kv_cache_bytes"),
                EnvVar("LLMP_INFERENCE_MAX_NUM_SEQS", "1024", "cap on a replica's engine.max_num_seqs"),
                EnvVar("LLMP_INFERENCE_MAX_NUM_BATCHED_TOKENS", "16384", "cap on engine.max_num_batched_tokens"),
                EnvVar("LLMP_INFERENCE_MAX_DRAFT_TOKENS", "16", "cap on a drafter's tokens per step (num_tokens)"),
                EnvVar(
                    "LLMP_INFERENCE_DEPLOY_TIMEOUT_SECONDS", "900.0", "LoadModel gives up (and removes it) after this"
                ),
                EnvVar(
                    "LLMP_INFERENCE_MANAGED_MODELS",
                    "",
                    "models the cluster's Serve config deploys (JSON, build_app args); set: Serve is the cluster's",
                ),
            ],
        ),
    ]
}


def env(name: str) -> str:
    """The value of a declared variable (its default when unset)."""
    var = VARIABLES[name]
    return os.environ.get(name, var.default)


def llmp_home() -> str:
    return os.path.expanduser(env("LLMP_HOME"))
