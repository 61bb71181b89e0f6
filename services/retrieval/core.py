"""The retrieval service's core: everything it does, as a plain Python class with no transport.

The gRPC servicer is a thin adapter over this class, and tests call it directly too. Methods
raise `libs.common.errors` exceptions for bad input. Ingest checks, chunks and embeds every
document before it writes anything. A document is then replaced as one step, as search sees it:

1. a journal record (collection, document, new generation, chunk count) is written to the store;
2. the new chunks are upserted under ids of their own generation, hidden from search meanwhile;
3. the chunks of every other generation of the document are deleted, then the record.

A crash anywhere leaves a journal record that the next start settles: if every chunk of the new
generation is stored, the older ones go (roll forward); otherwise the new ones go (roll back,
the previous version stays whole). A retry of the same call replaces again, so retries never
duplicate. Replacements of one document are serialised.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import threading
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from libs.common.artifacts import ArtifactStore, check_name
from libs.common.clients.tokenizer import TokenizerClient
from libs.common.errors import AlreadyExists, InvalidArgument
from services.retrieval.chunkers import CHUNKERS, KINDS, Chunk, Chunker
from services.retrieval.config import RetrievalConfig
from services.retrieval.embedders import EMBEDDERS, DenseEmbedder, Encoder, SparseEncoder
from services.retrieval.ranking import RRF_K
from services.retrieval.tokens import LocalTokens, ServiceTokens, TokenCounter
from services.retrieval.vectorstores import (
    DISTANCES,
    QUANTIZERS,
    Found,
    Layout,
    Point,
    Search,
    VectorStore,
    parse_filter,
)

MODES = ("dense", "sparse", "hybrid")
DEFAULT_EMBEDDER = {"type": "sentence_transformers"}
DEFAULT_SPARSE = {"type": "bm25"}
DEFAULT_CHUNKER = {"type": "recursive"}
CODE_SUFFIXES = {".py", ".pyi", ".js", ".ts", ".go", ".rs", ".java", ".c", ".h", ".cc", ".cpp", ".sh", ".rb"}
MARKDOWN_SUFFIXES = {".md", ".markdown"}
MAX_ID_CHARS = 512
#: Bounds of a collection's HNSW graph (Qdrant's defaults are m=16, ef_construct=100).
MAX_HNSW_M, MAX_EF_CONSTRUCT = 128, 4096
MAX_TEMPLATE_CHARS = 65536
POINT_NAMESPACE = uuid.UUID("6f1c2b1e-3c1a-4c53-9a0e-52b1d0f6a0c4")
JOURNAL = "_llmp_ingest_journal"
FAULT_POINTS = ("after_journal", "after_upsert")

log = logging.getLogger(__name__)
DEFAULT_TEMPLATE = (
    "Answer the question using only the numbered sources below, and cite them as [n].\n\n"
    "{context}\n\nQuestion: {question}\nAnswer:"
)


@dataclass(frozen=True)
class DocumentInput:
    id: str = ""
    text: str = ""
    path: str = ""
    kind: str = ""
    source: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Prepared:
    id: str
    source: str
    kind: str
    metadata: dict[str, Any]
    chunks: list[Chunk]


@dataclass(frozen=True)
class IngestPlan:
    spec: dict[str, Any]
    splitter: Chunker
    dense: DenseEmbedder
    tokens: TokenCounter
    bm25: SparseEncoder | None


@dataclass(frozen=True)
class Ingested:
    id: str
    chunks: int
    #: Chunks the previous version of the document had (0 on first ingest).
    replaced: int


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    spec: dict[str, Any]
    dim: int
    points: int


@dataclass(frozen=True)
class Mmr:
    diversity: float = 0.5
    #: Hits fetched before reranking; 0: 4 x top_k.
    candidates: int = 0


@dataclass(frozen=True)
class Query:
    collection: str
    query: str
    top_k: int = 10
    mode: str = "dense"
    filter: dict[str, Any] | None = None
    mmr: Mmr | None = None
    rrf_k: int = 0


@dataclass(frozen=True)
class Hit:
    score: float
    document_id: str
    source: str
    chunk_index: int
    start: int
    end: int
    text: str
    section: str
    metadata: dict[str, Any]


@dataclass(frozen=True)
class Citation:
    number: int
    source: str
    document_id: str
    start: int
    end: int
    score: float


@dataclass(frozen=True)
class Context:
    prompt: str
    citations: list[Citation]
    tokens: int
    dropped: int


def point_id(document_id: str, generation: str, index: int) -> str:
    return str(uuid.uuid5(POINT_NAMESPACE, f"{document_id}\x00{generation}\x00{index}"))


def journal_id(collection: str, document_id: str) -> str:
    return str(uuid.uuid5(POINT_NAMESPACE, f"journal\x00{collection}\x00{document_id}"))


def kind_of(path: str) -> str:
    suffix = PurePosixPath(path).suffix.lower()
    return "markdown" if suffix in MARKDOWN_SUFFIXES else "code" if suffix in CODE_SUFFIXES else "text"


def document_filter(document_id: str) -> dict[str, Any]:
    return {"must": [{"key": "document_id", "match": {"value": document_id}}]}


def generation_filter(document_id: str, generation: str, same: bool) -> dict[str, Any]:
    """Chunks of `document_id` of generation `generation` (same) or of any other one."""
    doc = {"key": "document_id", "match": {"value": document_id}}
    gen = {"key": "ingest", "match": {"value": generation}}
    return {"must": [doc, gen]} if same else {"must": [doc], "must_not": [gen]}


def hiding(filter: dict[str, Any] | None, generations: Sequence[str]) -> dict[str, Any] | None:
    """`filter` that also leaves out chunks of the given (in-flight) generations."""
    if not generations:
        return filter
    hidden: dict[str, Any] = {"must_not": [{"key": "ingest", "match": {"any": list(generations)}}]}
    return hidden | {"must": [filter]} if filter else hidden


class Preparer:
    """Turns documents into chunks and vectors, touching no store: the ingest path's first half.

    A Ray Data worker runs one of these; the service's core is one too.
    """

    def __init__(self, config: RetrievalConfig, artifacts: ArtifactStore) -> None:
        self.config = config
        self.artifacts = artifacts
        self._encoders: OrderedDict[str, Encoder] = OrderedDict()
        self._lock = threading.Lock()
        self._cache_lock = threading.Lock()  # the cache's dict only: never held while a model loads
        self._loading: dict[str, threading.Lock] = {}  # one lock per spec being loaded
        self._tokenizer_client: TokenizerClient | None = None

    def _cached(self, key: str) -> Encoder | None:
        with self._cache_lock:
            if key in self._encoders:
                self._encoders.move_to_end(key)
                return self._encoders[key]
            return None

    def encoder(self, spec: dict[str, Any], field: str = "embedder") -> Encoder:
        """A loaded embedder for `spec`, kept in a small LRU cache (models are slow to load).

        A load holds only its spec's own lock: calls for other models, and searches, go on meanwhile,
        and concurrent calls for the same spec wait for the one load."""
        key = json.dumps(spec, sort_keys=True)
        if (hit := self._cached(key)) is not None:
            return hit
        with self._cache_lock:
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:
            if (hit := self._cached(key)) is not None:
                return hit
            try:
                built: Encoder = EMBEDDERS.create(spec, field=field, artifacts=self.artifacts)
            finally:
                with self._cache_lock:
                    self._loading.pop(key, None)
            with self._cache_lock:
                self._encoders[key] = built
                while len(self._encoders) > self.config.embedder_cache:
                    self._encoders.popitem(last=False)
            return built

    def dense_embedder(self, spec: dict[str, Any], field: str = "embedder") -> DenseEmbedder:
        built = self.encoder(spec, field)
        if not isinstance(built, DenseEmbedder):
            raise InvalidArgument(f"{spec.get('type')!r} is not a dense embedder", field=field)
        return built

    def sparse_encoder(self, spec: dict[str, Any], field: str = "sparse_embedder") -> SparseEncoder:
        built = self.encoder(spec, field)
        if not isinstance(built, SparseEncoder):
            raise InvalidArgument(f"{spec.get('type')!r} is not a sparse embedder", field=field)
        return built

    def token_counter(self, tokenizer: str, embedder: DenseEmbedder, field: str) -> TokenCounter:
        """The named tokenizer of the tokenizer service, or the embedder's own tokeniser."""
        if not tokenizer:
            return LocalTokens(embedder.tokenizer)
        if self._tokenizer_client is None:
            self._tokenizer_client = TokenizerClient()
        return ServiceTokens(self._tokenizer_client, tokenizer, field)

    def chunker(self, spec: dict[str, Any]) -> tuple[Chunker, str]:
        """The chunker of a spec, and the tokenizer service name it asks for ("" for none)."""
        params = dict(spec)
        tokenizer = params.pop("tokenizer", "")
        if not isinstance(tokenizer, str):
            raise InvalidArgument("must be a tokenizer name", field="chunker.tokenizer")
        built = CHUNKERS.create(params, field="chunker")
        size = getattr(built, "size", None)
        if isinstance(size, int | float) and size > self.config.max_chunk_tokens:
            raise InvalidArgument(f"at most {self.config.max_chunk_tokens} tokens", field="chunker.size")
        return built, tokenizer

    def _check_texts(self, texts: Sequence[str], field: str) -> None:
        if not texts:
            raise InvalidArgument("at least one text is required", field=field)
        if len(texts) > self.config.max_batch:
            raise InvalidArgument(f"at most {self.config.max_batch} per call", field=field)
        for i, text in enumerate(texts):
            if not text.strip():
                raise InvalidArgument("empty text", field=f"{field}[{i}]")
            if len(text.encode()) > self.config.max_document_bytes:
                raise InvalidArgument(f"larger than {self.config.max_document_bytes} bytes", field=f"{field}[{i}]")

    def _read(self, doc: DocumentInput, field: str) -> str:
        if bool(doc.text) == bool(doc.path):
            raise InvalidArgument("give exactly one of text and path", field=field)
        if doc.text:
            return doc.text
        path = self.artifacts.path(doc.path, field=f"{field}.path")
        if not path.is_file():
            raise InvalidArgument(f"{doc.path!r} is not a file in the artifact store", field=f"{field}.path")
        if path.stat().st_size > self.config.max_document_bytes:
            raise InvalidArgument(f"larger than {self.config.max_document_bytes} bytes", field=f"{field}.path")
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument(f"{doc.path!r} is not UTF-8 text", field=f"{field}.path") from None

    def _prepare(self, doc: DocumentInput, field: str, chunker: Chunker, tokens: TokenCounter) -> Prepared:
        text = self._read(doc, field)
        if not text.strip():
            raise InvalidArgument("empty document", field=f"{field}.text")
        if len(text.encode()) > self.config.max_document_bytes:
            raise InvalidArgument(f"larger than {self.config.max_document_bytes} bytes", field=f"{field}.text")
        doc_id = doc.id or doc.path
        if not doc_id or len(doc_id) > MAX_ID_CHARS:
            raise InvalidArgument(f"an id of 1 to {MAX_ID_CHARS} characters is required", field=f"{field}.id")
        kind = doc.kind or kind_of(doc.path)
        if kind not in KINDS:
            raise InvalidArgument(f"must be one of {', '.join(KINDS)}", field=f"{field}.kind")
        chunks = chunker.split(text, kind, tokens)
        if len(chunks) > self.config.max_chunks_per_document:
            raise InvalidArgument(
                f"{len(chunks)} chunks; at most {self.config.max_chunks_per_document} per document "
                "(a larger chunker size makes fewer)",
                field=f"{field}.text",
            )
        return Prepared(doc_id, doc.source or doc.path or doc_id, kind, dict(doc.metadata), chunks)

    def plan(self, spec: dict[str, Any], chunker: dict[str, Any] | None = None) -> IngestPlan:
        """The parts that turn documents into a collection's chunks, vectors and sparse vectors."""
        splitter, tokenizer = self.chunker(chunker or spec["chunker"])
        dense = self.dense_embedder(spec["embedder"], "collection.embedder")
        tokens = self.token_counter(tokenizer, dense, "chunker.tokenizer")
        bm25 = self.sparse_encoder(spec["sparse_embedder"]) if spec["sparse"] else None
        return IngestPlan(spec, splitter, dense, tokens, bm25)

    def prepare(self, plan: IngestPlan, documents: Sequence[DocumentInput], first: int = 0) -> list[Prepared]:
        """Read, check and chunk documents; nothing is written. `first` numbers them in error fields."""
        prepared = [
            self._prepare(d, f"documents[{first + i}]", plan.splitter, plan.tokens) for i, d in enumerate(documents)
        ]
        chunks = sum(len(p.chunks) for p in prepared)
        if chunks > self.config.max_ingest_chunks:
            raise InvalidArgument(
                f"{chunks} chunks; at most {self.config.max_ingest_chunks} per call (send fewer documents)",
                field="documents",
            )
        ids = [p.id for p in prepared]
        if len(set(ids)) != len(ids):
            raise InvalidArgument("document ids must be unique within a request", field="documents.id")
        return prepared

    def vectors(self, plan: IngestPlan, prepared: Sequence[Prepared]) -> list[np.ndarray]:
        """Each document's chunk vectors, [chunks, dim], embedded in one batch."""
        vectors = plan.dense.embed([c.text for p in prepared for c in p.chunks])  # [chunks, dim]
        if vectors.shape[1] != plan.spec["dim"]:
            raise InvalidArgument(
                f"dimension mismatch: the embedder now makes {vectors.shape[1]}-dim vectors, "
                f"the collection holds {plan.spec['dim']}",
                field="collection.embedder",
            )
        bounds = np.cumsum([0, *(len(p.chunks) for p in prepared)])
        return [vectors[a:b] for a, b in itertools.pairwise(bounds)]


class RetrievalCore(Preparer):
    def __init__(self, config: RetrievalConfig, artifacts: ArtifactStore, store: VectorStore) -> None:
        super().__init__(config, artifacts)
        if config.fault_point and config.fault_point not in FAULT_POINTS:
            raise ValueError(f"fault_point must be one of {FAULT_POINTS}, not {config.fault_point!r}")
        self._documents_lock = threading.Lock()
        self._document_locks: dict[tuple[str, str], threading.Lock] = {}
        self._in_flight: dict[str, set[str]] = {}  # collection -> generations being written
        self.store = store
        self.recover()

    # -- the ingest journal ------------------------------------------------------------------
    def recover(self) -> int:
        """Settle replacements a crash interrupted (see the module docstring); returns how many."""
        settled = 0
        for key, entry in self.store.records(JOURNAL).items():
            collection, doc, generation = entry["collection"], entry["document_id"], entry["generation"]
            if self.store.exists(collection):
                stored = self.store.count(collection, generation_filter(doc, generation, same=True))
                complete = stored == entry["chunks"]
                self.store.delete(collection, generation_filter(doc, generation, same=not complete))
                log.warning(
                    "settled an interrupted ingest of %r in %r: %s (%d of %d new chunks were stored)",
                    doc, collection, "rolled forward" if complete else "rolled back", stored, entry["chunks"],
                )  # fmt: skip
            self.store.drop_record(JOURNAL, key)
            settled += 1
        return settled

    def _document_lock(self, collection: str, doc: str) -> threading.Lock:
        with self._documents_lock:
            return self._document_locks.setdefault((collection, doc), threading.Lock())

    def _fault(self, point: str) -> None:
        """Test hook (LLMP_RETRIEVAL_FAULT_POINT): die here as a crash would, with no clean-up."""
        if self.config.fault_point == point:
            os.kill(os.getpid(), signal.SIGKILL)

    # -- plugins -----------------------------------------------------------------------------

    # -- collections -------------------------------------------------------------------------
    def spec(self, collection: str) -> dict[str, Any]:
        check_name(collection, "collection")
        return self.store.metadata(collection)

    def create_collection(
        self,
        name: str,
        embedder: dict[str, Any] | None = None,
        distance: str = "",
        hnsw_m: int = 0,
        ef_construct: int = 0,
        quantization: bool = False,
        sparse: bool = False,
        sparse_embedder: dict[str, Any] | None = None,
        chunker: dict[str, Any] | None = None,
        dim: int = 0,
        quantizer: str = "",
    ) -> CollectionInfo:
        """`quantizer`: "scalar" or "binary"; empty: "scalar" when `quantization` is set, else none."""
        check_name(name)
        if quantizer and quantizer not in QUANTIZERS:
            raise InvalidArgument(f"must be one of {', '.join(QUANTIZERS)} (or empty)", field="quantizer")
        if hnsw_m > MAX_HNSW_M:
            raise InvalidArgument(f"at most {MAX_HNSW_M}", field="hnsw.m")
        if ef_construct > MAX_EF_CONSTRUCT:
            raise InvalidArgument(f"at most {MAX_EF_CONSTRUCT}", field="hnsw.ef_construct")
        distance = distance or "cosine"
        if distance not in DISTANCES:
            raise InvalidArgument(f"must be one of {', '.join(DISTANCES)}", field="distance")
        embedder = embedder or DEFAULT_EMBEDDER
        built = self.dense_embedder(embedder)
        if dim and dim != built.dim:
            raise InvalidArgument(f"dimension mismatch: {embedder['type']} makes {built.dim}-dim vectors", field="dim")
        sparse_spec = (sparse_embedder or DEFAULT_SPARSE) if sparse else None
        if sparse_spec:
            self.sparse_encoder(sparse_spec)
        chunker = chunker or DEFAULT_CHUNKER
        self.chunker(chunker)
        if self.store.exists(name):
            raise AlreadyExists(f"collection {name!r} already exists", field="name")
        layout = Layout(built.dim, distance, hnsw_m, ef_construct, quantizer or quantization, sparse)
        spec = {
            "embedder": embedder,
            "dim": built.dim,
            "distance": distance,
            "hnsw": {"m": hnsw_m, "ef_construct": ef_construct},
            "quantization": layout.quantizer or False,
            "sparse": sparse,
            "sparse_embedder": sparse_spec,
            "chunker": chunker,
        }
        self.store.create(name, layout, spec)
        return CollectionInfo(name, spec, built.dim, 0)

    def describe(self, name: str) -> CollectionInfo:
        spec = self.spec(name)
        return CollectionInfo(name, spec, int(spec["dim"]), self.store.count(name))

    def list_collections(self) -> list[CollectionInfo]:
        return [self.describe(n) for n in self.store.names()]

    def delete_collection(self, name: str) -> bool:
        self.spec(name)
        return self.store.drop(name)

    # -- embeddings --------------------------------------------------------------------------

    def embed(
        self, texts: Sequence[str], embedder: dict[str, Any] | None = None, collection: str = ""
    ) -> tuple[np.ndarray, int, str]:
        """[len(texts), dim] rows, the tokens counted, and the embedder's type name."""
        self._check_texts(texts, "texts")
        spec = self.spec(collection)["embedder"] if collection else (embedder or DEFAULT_EMBEDDER)
        built = self.dense_embedder(spec)
        return built.embed(texts), sum(built.count_tokens(texts)), str(spec["type"])

    # -- ingest ------------------------------------------------------------------------------

    def ingest(
        self, collection: str, documents: Sequence[DocumentInput], chunker: dict[str, Any] | None = None
    ) -> list[Ingested]:
        spec = self.spec(collection)
        if not documents:
            raise InvalidArgument("at least one document is required", field="documents")
        if len(documents) > self.config.max_batch:
            raise InvalidArgument(f"at most {self.config.max_batch} per call", field="documents")
        plan = self.plan(spec, chunker)
        prepared = self.prepare(plan, documents)
        vectors = self.vectors(plan, prepared)
        return [self.write(collection, doc, rows, plan.bm25) for doc, rows in zip(prepared, vectors, strict=True)]

    def write(self, collection: str, doc: Prepared, vectors: np.ndarray, bm25: SparseEncoder | None) -> Ingested:
        """Replace one document by a new generation of its chunks, journalled (see the module docstring)."""
        ingest = uuid.uuid4().hex
        points = [
            Point(
                point_id(doc.id, ingest, c.index),
                vector.tolist(),
                {
                    "document_id": doc.id,
                    "source": doc.source,
                    "kind": doc.kind,
                    "chunk_index": c.index,
                    "start": c.start,
                    "end": c.end,
                    "section": c.section,
                    "text": c.text,
                    "ingest": ingest,
                    "metadata": doc.metadata,
                },
                bm25.document(c.text) if bm25 else None,
            )
            for c, vector in zip(doc.chunks, vectors, strict=True)
        ]
        key = journal_id(collection, doc.id)
        with self._document_lock(collection, doc.id):
            previous = self.store.count(collection, document_filter(doc.id))
            entry = {"collection": collection, "document_id": doc.id, "generation": ingest, "chunks": len(points)}
            self.store.put_record(JOURNAL, key, entry)
            self._fault("after_journal")
            with self._lock:
                self._in_flight.setdefault(collection, set()).add(ingest)
            try:
                self.store.upsert(collection, points)
                self._fault("after_upsert")
            except BaseException:
                self.store.delete(collection, generation_filter(doc.id, ingest, same=True))
                self.store.drop_record(JOURNAL, key)
                raise
            finally:
                with self._lock:
                    self._in_flight[collection].discard(ingest)
            self.store.delete(collection, generation_filter(doc.id, ingest, same=False))
            self.store.drop_record(JOURNAL, key)
        return Ingested(doc.id, len(points), previous)

    def _visible(self, collection: str, filter: dict[str, Any] | None) -> dict[str, Any] | None:
        with self._lock:
            return hiding(filter, sorted(self._in_flight.get(collection, ())))

    def delete_documents(self, collection: str, ids: Sequence[str]) -> int:
        self.spec(collection)
        if not ids:
            raise InvalidArgument("at least one id is required", field="ids")
        return sum(self.store.delete(collection, document_filter(i)) for i in ids)

    # -- search ------------------------------------------------------------------------------
    def _check_query(self, q: Query, spec: dict[str, Any]) -> None:
        if not q.query.strip():
            raise InvalidArgument("empty query", field="query")
        if len(q.query.encode()) > self.config.max_document_bytes:
            raise InvalidArgument(f"larger than {self.config.max_document_bytes} bytes", field="query")
        if not 0 < q.top_k <= self.config.max_top_k:
            raise InvalidArgument(f"must be 1..{self.config.max_top_k}", field="top_k")
        if q.mode not in MODES:
            raise InvalidArgument(f"must be one of {', '.join(MODES)}", field="mode")
        if q.mode != "dense" and not spec["sparse"]:
            raise InvalidArgument(f"collection {q.collection!r} has no sparse vectors", field="mode")
        if q.mmr and not 0 <= q.mmr.diversity <= 1:
            raise InvalidArgument("must be in [0, 1]", field="mmr.diversity")
        if q.mmr and q.mmr.candidates > self.config.max_mmr_candidates:
            raise InvalidArgument(f"at most {self.config.max_mmr_candidates}", field="mmr.candidates")
        parse_filter(q.filter)

    def search(self, q: Query) -> list[Hit]:
        """Dense, sparse or hybrid (RRF) retrieval, optionally MMR-reranked, all in one store call."""
        spec = self.spec(q.collection)
        self._check_query(q, spec)
        vector = None
        if q.mode != "sparse" or q.mmr:
            vector = self.dense_embedder(spec["embedder"], "collection.embedder").embed([q.query])[0].tolist()
        sparse = self.sparse_encoder(spec["sparse_embedder"]).query(q.query) if q.mode != "dense" else None
        found = self.store.search(
            q.collection,
            Search(
                q.top_k,
                dense=None if q.mode == "sparse" else vector,
                sparse=sparse,
                filter=self._visible(q.collection, q.filter),
                rrf_k=q.rrf_k or RRF_K,
                mmr=q.mmr.diversity if q.mmr else None,
                candidates=q.mmr.candidates if q.mmr else 0,
                mmr_vector=vector,
            ),
        )
        return [self._hit(f) for f in found]

    @staticmethod
    def _hit(f: Found) -> Hit:
        p = f.payload
        return Hit(
            f.score, p["document_id"], p["source"], p["chunk_index"], p["start"], p["end"], p["text"],
            p.get("section", ""), p.get("metadata") or {},
        )  # fmt: skip

    # -- RAG context -------------------------------------------------------------------------
    def build_context(self, q: Query, max_tokens: int = 1024, tokenizer: str = "", template: str = "") -> Context:
        """Retrieve, then add numbered sources best first while the whole prompt fits `max_tokens`."""
        template = template or DEFAULT_TEMPLATE
        if len(template) > MAX_TEMPLATE_CHARS:
            raise InvalidArgument(f"at most {MAX_TEMPLATE_CHARS} characters", field="template")
        if "{context}" not in template or "{question}" not in template:
            raise InvalidArgument("must contain {context} and {question}", field="template")
        spec = self.spec(q.collection)
        embedder = self.dense_embedder(spec["embedder"], "collection.embedder")
        counter = self.token_counter(tokenizer, embedder, "tokenizer")
        hits = self.search(q)

        def render(blocks: list[str]) -> str:
            return template.replace("{context}", "\n\n".join(blocks)).replace("{question}", q.query)

        tokens = counter.count([render([])])[0]
        if tokens > max_tokens:
            raise InvalidArgument(f"the question and template alone take {tokens} tokens", field="max_tokens")
        blocks: list[str] = []
        citations: list[Citation] = []
        for hit in hits:
            number = len(citations) + 1
            block = f"[{number}] {hit.source} (characters {hit.start}-{hit.end})\n{hit.text}"
            size = counter.count([render([*blocks, block])])[0]
            if size > max_tokens:
                continue
            blocks.append(block)
            citations.append(Citation(number, hit.source, hit.document_id, hit.start, hit.end, hit.score))
            tokens = size
        return Context(render(blocks), citations, tokens, len(hits) - len(citations))

    def close(self) -> None:
        """Release the vector store (the embedded Qdrant's directory lock) once serving has stopped."""
        self.store.close()
