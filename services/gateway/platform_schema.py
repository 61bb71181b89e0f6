"""Request bodies of the platform API (/api/v1), checked at the edge."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Name = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
# A relative path in the artifact store: names of at most 128 characters (the store's rule), no '..'.
StorePath = Annotated[str, Field(max_length=512, pattern=rf"^{_PART}(/{_PART}){{0,7}}$")]
# A registry reference: "name", "name:latest" or "name:<version>".
Ref = Annotated[str, Field(max_length=160, pattern=rf"^{_PART}(:[A-Za-z0-9]{{1,20}})?$")]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateKey(Body):
    name: str = Field(min_length=1, max_length=200)
    scopes: list[Literal["inference", "retrieval", "training", "tokenizer", "admin"]] = Field(min_length=1)
    ttl_seconds: Annotated[float, Field(ge=0, le=10 * 365 * 86400)] = 0
    requests_per_minute: Annotated[int, Field(ge=0, le=2**31)] | None = None
    tokens_per_minute: Annotated[int, Field(ge=0, le=2**31)] | None = None


class TrainTokenizer(Body):
    name: Name
    algorithm: str = Field(default="byte_level_bpe", min_length=1)
    vocab_size: Annotated[int, Field(ge=1, le=1 << 22)]
    corpus: list[StorePath] = []
    """Corpus names in the store (from POST /api/v1/corpora)."""
    texts: list[str] = []
    special_tokens: list[str] = []
    chat_template: str = ""
    min_frequency: Annotated[int, Field(ge=0, le=1 << 30)] = 0


class UploadCorpus(Body):
    name: Name
    documents: list[str] = Field(min_length=1)


class Encode(Body):
    text: str
    add_special_tokens: bool = True


class Decode(Body):
    ids: list[Annotated[int, Field(ge=0, lt=2**32)]]
    skip_special_tokens: bool = True


class SubmitJob(Body):
    type: str = Field(min_length=1, max_length=64)
    config: dict[str, Any] = {}
    client_token: str = Field(default="", max_length=200)


class LoadModel(Body):
    """A model from the registry (`model`: "name:version") or a store folder (`path`: "models/x/1")."""

    model: Ref | None = None
    path: StorePath | None = None
    name: str = Field(default="", max_length=128)
    quantization: str = Field(default="", max_length=256)
    """A quantizer name ("int8", "int4", "nf4") or its JSON spec."""
    speculative: str = Field(default="", max_length=512)
    """A drafter name ("ngram") or its JSON spec ({"type": "draft_model", "model": "models/draft/1"})."""
    dtype: Literal["", "float32", "bfloat16", "float16"] = ""
    kv_cache_bytes: Annotated[int, Field(ge=0, lt=2**63)] = 0
    max_model_len: Annotated[int, Field(ge=0, lt=2**32)] = 0
    min_replicas: Annotated[int, Field(ge=0, le=1024)] | None = None
    max_replicas: Annotated[int, Field(ge=1, le=1024)] | None = None
    num_cpus: Annotated[float, Field(ge=0, le=1024)] | None = None
    num_gpus: Annotated[float, Field(ge=0, le=1024)] = 0


class LoadAdapter(Body):
    name: Name
    path: StorePath


class CreateCollection(Body):
    name: Name
    embedder: dict[str, Any] | None = None
    distance: Literal["", "cosine", "dot", "euclid", "manhattan"] = ""
    sparse: bool = False
    quantization: bool = False
    quantizer: Literal["", "scalar", "binary"] = ""
    """The quantised copy: "scalar" (int8) or "binary" (one bit); empty: "scalar" if `quantization` is set."""
    chunker: dict[str, Any] | None = None


class DocumentIn(Body):
    id: str = Field(min_length=1, max_length=512)
    text: str = Field(min_length=1)
    kind: Literal["", "text", "markdown", "code"] = ""
    source: str = Field(default="", max_length=1024)
    metadata: dict[str, Any] | None = None


class Ingest(Body):
    documents: list[DocumentIn] = Field(min_length=1)
    chunker: dict[str, Any] | None = None


class IngestCorpus(Body):
    corpus: StorePath
    """A corpus name in the store (uploaded with POST /api/v1/corpora), never a server path."""
    patterns: list[str] = []
    chunker: dict[str, Any] | None = None


class Search(Body):
    query: str = Field(min_length=1)
    top_k: Annotated[int, Field(ge=1, le=1000)] = 10
    mode: Literal["dense", "sparse", "hybrid"] = "dense"
    filter: dict[str, Any] | None = None


class PlanMemory(Body):
    preset: str = "llama-3-8b"
    config: dict[str, Any] | None = None
    """A Hugging Face config.json's content instead of a preset."""
    tokens: Annotated[int, Field(ge=1, le=1 << 24)] = 4096
    batch: Annotated[int, Field(ge=1, le=1 << 16)] = 1


class PlanCompute(Body):
    flops: Annotated[float, Field(ge=1, le=1e40)]
    tokens_per_param: Annotated[float, Field(ge=1e-3, le=1e6)] = 20.0


class Answer(Body):
    collection: Name
    question: str = Field(min_length=1)
    model: str = Field(min_length=1)
    top_k: Annotated[int, Field(ge=1, le=100)] = 5
    mode: Literal["dense", "sparse", "hybrid"] = "dense"
    context_tokens: Annotated[int, Field(ge=16, le=1 << 20)] = 1024
    tokenizer: str = ""
    max_tokens: Annotated[int, Field(ge=1, le=1 << 20)] = 256
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.0
    chat: bool = False
    stream: bool = False
