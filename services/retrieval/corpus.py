"""Ingest a whole corpus from the artifact store, with progress, in-process or on Ray Data.

Every file under a folder (matching the patterns) is checked first — readable, UTF-8, not empty,
not too large — so a bad file refuses the request before anything is written. Then documents go
through in batches: chunk and embed (the slow half), then written one document at a time by the
core's journalled replacement, so each is all-or-nothing and a retry converges. A progress report
follows every batch.

The slow half runs in this process ("local") or on Ray Data ("ray": `map_batches` over actors
that each hold a `Preparer` with its models loaded), chosen per request or, with "auto", when
the corpus has at least `ray_min_documents` documents and the service joined a Ray. Writes stay
in the service: the embedded Qdrant has one writer, and a server gets batches it can take.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from libs.common.artifacts import ArtifactStore
from libs.common.errors import FailedPrecondition, InvalidArgument
from libs.common.local_ray import start_local_ray
from libs.common.settings import llmp_home
from services.retrieval.config import RetrievalConfig
from services.retrieval.core import DocumentInput, Prepared, Preparer, RetrievalCore

log = logging.getLogger(__name__)

ENGINES = ("auto", "local", "ray")
DEFAULT_PATTERNS = ("*.md", "*.markdown", "*.txt", "*.rst", "*.py")


@dataclass(frozen=True)
class Progress:
    documents_done: int
    documents_total: int
    chunks_done: int
    engine: str


def list_corpus(
    artifacts: ArtifactStore, path: str, patterns: Sequence[str], max_bytes: int, max_documents: int
) -> list[DocumentInput]:
    """The corpus's documents (id = path in the store), each checked; the first bad one is refused."""
    root = artifacts.path(path, field="path")
    if not root.exists():
        raise InvalidArgument(f"{path!r} is not in the artifact store", field="path")
    patterns = list(patterns) or list(DEFAULT_PATTERNS)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    chosen = [f for f in files if any(fnmatch.fnmatch(f.name, pattern) for pattern in patterns)]
    if not chosen:
        raise InvalidArgument(f"no file under {path!r} matches {patterns}", field="path")
    if len(chosen) > max_documents:
        raise InvalidArgument(f"{len(chosen)} documents; at most {max_documents} per call", field="path")
    documents = []
    for f in chosen:
        relative = artifacts.relative(f)
        _check_file(f, relative, max_bytes)
        documents.append(DocumentInput(id=relative, path=relative))
    return documents


def _check_file(f: Path, relative: str, max_bytes: int) -> None:
    size = f.stat().st_size
    if size > max_bytes:
        raise InvalidArgument(f"{relative!r} is larger than {max_bytes} bytes", field="path")
    try:
        text = f.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"{relative!r} is not UTF-8 text (byte {e.start})", field="path") from None
    if not text.strip():
        raise InvalidArgument(f"{relative!r} is empty", field="path")


def choose_engine(requested: str, documents: int, config: RetrievalConfig, ray_joined: bool) -> str:
    if requested not in ("", *ENGINES):
        raise InvalidArgument(f"must be one of {', '.join(ENGINES)}", field="engine")
    if requested == "ray" and not ray_joined:
        raise FailedPrecondition("this service has no Ray (LLMP_RETRIEVAL_RAY is off, or RAY_ADDRESS unset)")
    if requested in ("", "auto"):
        return "ray" if ray_joined and documents >= config.ray_min_documents else "local"
    return requested


def ingest_corpus(
    core: RetrievalCore,
    collection: str,
    documents: Sequence[DocumentInput],
    chunker: dict[str, Any] | None,
    engine: str,
    batch: int,
    cancelled: Callable[[], bool] = lambda: False,
) -> Iterator[Progress]:
    """Write `documents` into `collection`, yielding progress after each batch."""
    spec = core.spec(collection)
    plan = core.plan(spec, chunker)  # refuses a bad chunker before any work
    batch = max(1, min(batch or core.config.ingest_batch, core.config.max_batch))
    batches = [documents[i : i + batch] for i in range(0, len(documents), batch)]
    prepared: Iterator[list[tuple[Prepared, np.ndarray]]]
    if engine == "ray":
        prepared = _on_ray(core, spec, chunker, batches)
    else:

        def local() -> Iterator[list[tuple[Prepared, np.ndarray]]]:
            for i, docs in enumerate(batches):
                ready = core.prepare(plan, docs, first=i * batch)
                yield list(zip(ready, core.vectors(plan, ready), strict=True))

        prepared = local()
    done = chunks = 0
    yield Progress(0, len(documents), 0, engine)
    for ready in prepared:
        for doc, vectors in ready:
            chunks += core.write(collection, doc, vectors, plan.bm25).chunks
        done += len(ready)
        yield Progress(done, len(documents), chunks, engine)
        if cancelled():
            return


class _RayPreparer:
    """A Ray Data actor: chunks and embeds batches of documents with its own loaded models."""

    def __init__(self, config: RetrievalConfig, root: str, spec: dict[str, Any], chunker: dict[str, Any] | None):
        self.preparer = Preparer(config, ArtifactStore(root))
        self.plan = self.preparer.plan(spec, chunker)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        docs = [pickle.loads(raw) for raw in rows["document"]]
        ready = self.preparer.prepare(self.plan, docs, first=int(rows["index"][0]))
        vectors = self.preparer.vectors(self.plan, ready)
        out = [pickle.dumps((doc, rows_of_doc)) for doc, rows_of_doc in zip(ready, vectors, strict=True)]
        return {"prepared": np.array(out, dtype=object)}


Batches = Sequence[Sequence[DocumentInput]]


def _on_ray(
    core: RetrievalCore, spec: dict[str, Any], chunker: dict[str, Any] | None, batches: Batches
) -> Iterator[list[tuple[Prepared, np.ndarray]]]:
    import ray.data

    items = [{"document": pickle.dumps(doc), "index": i} for i, doc in enumerate(d for docs in batches for d in docs)]
    size = len(batches[0])
    dataset = ray.data.from_items(items, override_num_blocks=len(batches)).map_batches(
        _RayPreparer,
        fn_constructor_args=(core.config, str(core.artifacts.root), spec, chunker),
        batch_size=size,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, core.config.ray_workers)),
        num_cpus=1,
    )
    for rows in dataset.iter_batches(batch_size=size, batch_format="numpy"):
        yield [pickle.loads(raw) for raw in rows["prepared"]]


def join_ray(config: RetrievalConfig) -> bool:
    """Join a Ray for Ray Data ingests, before serving (Ray forks, which busy gRPC threads make unsafe)."""
    address = os.environ.get("RAY_ADDRESS")
    if config.ray == "off" or (config.ray == "auto" and not address):
        return False
    import ray

    if address:
        ray.init(address=address)
    else:  # a Ray of our own, as secure as the stack's, never another process's that happens to run here
        start_local_ray(Path(llmp_home()), include_dashboard=False, num_cpus=config.ray_workers)
    ray.data.DataContext.get_current().enable_progress_bars = False
    log.info("joined Ray at %s for corpus ingests", ray.get_runtime_context().gcs_address)
    return True
