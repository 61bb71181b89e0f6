"""The data the inference service's parts exchange: model options, requests, stream chunks, stats.

Plain dataclasses, so they cross a Ray Serve handle (pickled) as easily as a function call, and
the gRPC servicer maps them to and from `llmp.inference.v1` messages.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from libs.common.errors import InvalidArgument
from services.inference.engine import SamplingParams, TokenLogprob


@dataclass(frozen=True)
class ReplicaOptions:
    """How a model's Ray Serve deployment scales and what one replica may hold."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 0.0
    """0: half of max_ongoing_requests."""
    max_ongoing_requests: int = 64
    max_queued_requests: int = 64
    """0: refuse what the replicas cannot start at once."""
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory_bytes: int = 0
    """Memory one replica may use (a Ray resource); 0: what the node has free."""


@dataclass(frozen=True)
class EngineOptions:
    """What one replica's engine is built with."""

    kv_cache_bytes: int = 512 * 2**20
    dtype: str = "float32"
    max_model_len: int = 0
    """0: the model's, capped by the KV cache."""
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    quantization: str = ""
    """A quantizer plugin name or JSON spec; empty: full precision (or as stored)."""
    speculative: str = ""
    """A drafter plugin name or JSON spec; empty: no speculative decoding."""
    rope_scaling: str = ""
    """JSON {"rope_type": "linear" | "dynamic" | "yarn", "factor": f, ...}; empty: as trained."""
    compile: bool = False
    """Decode steps as one compiled graph (engine/model_runner.py)."""
    sliding_window: int | None = None
    """Attend to the last this many tokens only, freeing KV blocks older than that; None: the model's."""
    packed_only: bool = False
    """bfloat16 weights in the packed layout only, without the plain copy that steps of a few rows read
    (EngineConfig.few_rows_kernel)."""


@dataclass(frozen=True)
class ModelSpec:
    """A model to serve: its served name, its folder in the artifact store and its options."""

    name: str
    path: str
    replicas: ReplicaOptions = field(default_factory=ReplicaOptions)
    engine: EngineOptions = field(default_factory=EngineOptions)


def model_spec_of(data: Any, where: str = "model") -> ModelSpec:
    """A ModelSpec from plain data, as a Serve config's application args or a setting give it:
    {"name", "path", "replicas": {ReplicaOptions' fields}, "engine": {EngineOptions' fields}}.
    A missing name or path, an unknown key or a value of the wrong type is refused, naming the field."""
    data = _mapping(data, where)
    _known(data, {"name", "path", "replicas", "engine"}, where)
    name, path = (data.get(key) for key in ("name", "path"))
    for key, value in (("name", name), ("path", path)):
        if not isinstance(value, str) or not value:
            raise InvalidArgument("must be a non-empty string", field=f"{where}.{key}")
    replicas = _options(ReplicaOptions, data.get("replicas", {}), f"{where}.replicas")
    engine = _options(EngineOptions, data.get("engine", {}), f"{where}.engine")
    return ModelSpec(str(name), str(path), replicas, engine)


def _mapping(data: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise InvalidArgument(f"must be a mapping, not {type(data).__name__}", field=where)
    return data


def _known(data: Mapping[str, Any], keys: set[str], where: str) -> None:
    for key in data:
        if key not in keys:
            raise InvalidArgument(f"unknown key {key!r} (known: {', '.join(sorted(keys))})", field=f"{where}.{key}")


_T = typing.TypeVar("_T", ReplicaOptions, EngineOptions)


def _options(cls: type[_T], data: Any, where: str) -> _T:
    """`cls` from a mapping of its fields: ints as ints, floats as numbers, strings and booleans as such."""
    data = _mapping(data, where)
    hints = typing.get_type_hints(cls)
    _known(data, {f.name for f in fields(cls)}, where)
    for key, value in data.items():
        tp = hints[key]
        ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
        if tp is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok:
            raise InvalidArgument(f"must be {tp.__name__}, not {value!r}", field=f"{where}.{key}")
    values: dict[str, Any] = {k: float(v) if hints[k] is float else v for k, v in data.items()}
    return cls(**values)


@dataclass(frozen=True)
class GenerateInput:
    """One request as a replica receives it: text, token ids or chat messages, exactly one of them."""

    request_id: str
    params: SamplingParams
    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    """(role, content) pairs, rendered with the model's chat template."""
    stream: bool = True
    """False: the replica sends only the final chunk, with whole completions."""
    submitted_at: float = 0.0
    """time.time() when the front process accepted the request (for the queue-time metric)."""
    adapter_path: str = ""
    """The store folder of params.adapter, which a replica loads on first use."""


@dataclass
class CompletionChunk:
    """What one completion gained (stream) or holds (final, unary)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0


@dataclass
class Chunk:
    """One message of a request's stream from a replica."""

    request_id: str
    completions: list[CompletionChunk]
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    """Tokens generated so far, over all completions."""
    finished: bool
    queue_seconds: float | None = None
    """Set on the first chunk: how long the request waited before a replica took it."""


@dataclass(frozen=True)
class ReplicaStats:
    """A replica's load, as it reports it."""

    replica_id: str
    running: int
    waiting: int
    kv_cache_usage: float
    kv_cache_blocks: int
    max_model_len: int
    load_seconds: float
    bytes_per_parameter: float = 0.0


@dataclass(frozen=True)
class ModelFacts:
    """What config.json and the folder say about a model, read without loading weights."""

    model_type: str
    vocab_size: int
    context_length: int
    has_tokenizer: bool
    parameters: int = 0
    weight_bytes: int = 0
    """Of the weights as served (dtype or quantisation), by the memory planner."""
    plain_copy_bytes: int = 0
    """Of the plain copy of bfloat16 projections kept beside the packed ones (EngineOptions.packed_only)."""
    kv_bytes_per_token: int = 0
    has_chat_template: bool = False
    sampling_defaults: SamplingParams = field(default_factory=SamplingParams)
    """The engine's defaults overridden by the model's generation_config.json."""


@dataclass(frozen=True)
class ModelLoad:
    """A model's load across its replicas."""

    replicas: int = 0
    requests_in_flight: int = 0
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    """Used blocks over all blocks of the reporting replicas."""
    kv_cache_blocks: int = 0
    load_seconds: float = 0.0
    bytes_per_parameter: float = 0.0
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    cold_start_seconds: float = 0.0

    @classmethod
    def of(
        cls, stats: list[ReplicaStats], in_flight: int, drafted: int = 0, accepted: int = 0, cold_start: float = 0.0
    ) -> ModelLoad:
        blocks = sum(s.kv_cache_blocks for s in stats)
        used = sum(s.kv_cache_usage * s.kv_cache_blocks for s in stats)
        return cls(
            replicas=len(stats),
            requests_in_flight=in_flight,
            running=sum(s.running for s in stats),
            waiting=sum(s.waiting for s in stats),
            kv_cache_usage=used / blocks if blocks else 0.0,
            kv_cache_blocks=blocks,
            load_seconds=max((s.load_seconds for s in stats), default=0.0),
            bytes_per_parameter=max((s.bytes_per_parameter for s in stats), default=0.0),
            draft_tokens=drafted,
            accepted_draft_tokens=accepted,
            cold_start_seconds=cold_start,
        )


@dataclass(frozen=True)
class ModelStatus:
    """What GetModelInfo reports."""

    spec: ModelSpec
    facts: ModelFacts
    load: ModelLoad
    context_length: int
    adapters: tuple[str, ...] = ()
