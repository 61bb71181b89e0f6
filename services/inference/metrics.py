"""Prometheus metrics of the inference service, named like vLLM's under `llmp_`.

All of them are exported by the front process (its metrics port). Latencies and token counts
are measured there from each request's stream: time to first token and inter-token latency for
GenerateStream calls (a unary Generate receives one message, so only its end-to-end latency is
known). Queue time is how long a request waited before a replica took it (the replica compares
its clock with the front's stamp). Running and waiting sequences and KV-cache usage are reported
by each replica to its model's stats board (serve_app.py) and copied into gauges here whenever
the front reads them (GetModelInfo, ListModels, and once a second while requests run).
Speculative decoding's drafted and accepted tokens are counted from each request's final message,
a cold start (a request reaching a model scaled to zero) is timed to its first output, and the
calls the front makes to replicas are counted (requests that arrive together share one).
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

from services.inference.schema import Chunk, ReplicaStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

TIME_TO_FIRST_TOKEN = Histogram(
    "llmp_time_to_first_token_seconds", "Time to first token of streamed requests", ["model"], buckets=_LATENCY_BUCKETS
)
INTER_TOKEN_LATENCY = Histogram(
    "llmp_inter_token_latency_seconds", "Time between streamed tokens", ["model"], buckets=_TOKEN_BUCKETS
)
E2E_LATENCY = Histogram(
    "llmp_e2e_request_latency_seconds", "Request latency, start to last token", ["model"], buckets=_LATENCY_BUCKETS
)
QUEUE_TIME = Histogram(
    "llmp_request_queue_time_seconds", "Time waiting for a replica", ["model"], buckets=_LATENCY_BUCKETS
)
PROMPT_TOKENS = Counter("llmp_prompt_tokens", "Prompt tokens processed", ["model"])
GENERATION_TOKENS = Counter("llmp_generation_tokens", "Tokens generated", ["model"])
REQUESTS_FINISHED = Counter("llmp_request_success", "Requests finished, by finish reason", ["model", "finish_reason"])
RUNNING = Gauge("llmp_num_requests_running", "Sequences in a replica's running batch", ["model", "replica"])
WAITING = Gauge("llmp_num_requests_waiting", "Sequences waiting in a replica's engine", ["model", "replica"])
SPEC_DRAFT_TOKENS = Counter(
    "llmp_spec_decode_num_draft_tokens", "Tokens proposed by the drafter (speculative decoding)", ["model"]
)
SPEC_ACCEPTED_TOKENS = Counter(
    "llmp_spec_decode_num_accepted_tokens", "Drafted tokens the target model accepted", ["model"]
)
COLD_START = Histogram(
    "llmp_cold_start_seconds",
    "From a request reaching a model scaled to zero until its first output",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
REPLICA_CALLS = Counter(
    "llmp_replica_calls",
    "Calls from the front to a model's replicas; requests that arrive together share one",
    ["model"],
)
KV_CACHE_USAGE = Gauge(
    "llmp_kv_cache_usage_perc", "Fraction of a replica's KV-cache blocks in use", ["model", "replica"]
)


class RequestTimer:
    """Observes one request's stream: call `chunk` for every message, then `done`."""

    def __init__(self, model: str, streamed: bool) -> None:
        self.model, self.streamed = model, streamed
        self.start = self.last = time.perf_counter()
        self.tokens = 0
        self.prompt_tokens = 0

    def chunk(self, chunk: Chunk) -> None:
        now = time.perf_counter()
        new = sum(len(c.token_ids) for c in chunk.completions)
        if chunk.queue_seconds is not None:
            QUEUE_TIME.labels(self.model).observe(chunk.queue_seconds)
        if self.streamed and new:
            if self.tokens == 0:
                TIME_TO_FIRST_TOKEN.labels(self.model).observe(now - self.start)
            else:
                INTER_TOKEN_LATENCY.labels(self.model).observe((now - self.last) / new)
            self.last = now
        self.tokens += new
        self.prompt_tokens = chunk.prompt_tokens

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def done(self, last: Chunk | None) -> None:
        """`last`: the request's final chunk (None: it ended before any), whose counts are totals."""
        E2E_LATENCY.labels(self.model).observe(time.perf_counter() - self.start)
        PROMPT_TOKENS.labels(self.model).inc(self.prompt_tokens)
        GENERATION_TOKENS.labels(self.model).inc(self.tokens)
        for c in last.completions if last else []:
            REQUESTS_FINISHED.labels(self.model, c.finish_reason or "abort").inc()
            SPEC_DRAFT_TOKENS.labels(self.model).inc(c.draft_tokens)
            SPEC_ACCEPTED_TOKENS.labels(self.model).inc(c.accepted_draft_tokens)
        if last is None:
            REQUESTS_FINISHED.labels(self.model, "abort").inc()


_replicas_of: dict[str, set[str]] = {}


def record_replicas(model: str, stats: list[ReplicaStats]) -> None:
    """Replace the model's replica gauges with the latest reports (none: the model is gone)."""
    current = {s.replica_id for s in stats}
    for gone in _replicas_of.get(model, set()) - current:
        for gauge in (RUNNING, WAITING, KV_CACHE_USAGE):
            gauge.remove(model, gone)
    _replicas_of[model] = current
    for s in stats:
        RUNNING.labels(model, s.replica_id).set(s.running)
        WAITING.labels(model, s.replica_id).set(s.waiting)
        KV_CACHE_USAGE.labels(model, s.replica_id).set(s.kv_cache_usage)
