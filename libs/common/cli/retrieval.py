"""`llmp retrieval ...`: collections, ingest, search and RAG context through the retrieval service.

    llmp retrieval create docs --sparse --embedder '{"type": "sentence_transformers"}'
    llmp retrieval ingest docs README.md notes/*.md     # local files, sent as text; a progress bar
    llmp retrieval ingest-corpus docs corpora/pydoc     # a folder of the artifact store, on the server
    llmp retrieval search docs "How are jobs resumed?" --mode hybrid -k 5
    llmp retrieval context docs "How are jobs resumed?" --max-tokens 512
    llmp retrieval list / describe docs / delete docs
    llmp retrieval embed "a sentence" "another"

Specs (embedder, chunker, filter) are JSON objects, as the service takes them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from google.protobuf import json_format
from llmp.retrieval.v1 import retrieval_pb2 as pb
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from libs.common.cli.rpc_errors import remote
from libs.common.clients.retrieval import RetrievalClient

console = Console()
SERVICE = "the retrieval service"


def spec(value: str | None, param: str) -> dict[str, Any] | None:
    """A JSON object given on the command line (None when absent)."""
    if not value:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"not JSON: {e.msg}", param_hint=param) from None
    if not isinstance(parsed, dict):
        raise click.BadParameter("must be a JSON object", param_hint=param)
    return parsed


def info_line(info: pb.CollectionInfo) -> str:
    embedder = json_format.MessageToDict(info.spec).get("embedder", {}).get("type", "?")
    return f"{info.name}: {info.points} chunks, dim {info.dim}, embedder {embedder}"


@click.group("retrieval")
def group() -> None:
    """Collections: create, ingest, search, build a cited RAG context."""


@group.command()
@click.argument("name")
@click.option("--embedder", help='dense embedder spec, JSON (default {"type": "sentence_transformers"})')
@click.option("--chunker", help='default chunker spec, JSON (default {"type": "recursive"})')
@click.option("--distance", default="", help="cosine (default), dot, euclid or manhattan")
@click.option("--sparse", is_flag=True, help="keep a BM25 vector per chunk too (sparse and hybrid search)")
@click.option("--quantization", is_flag=True, help="int8 scalar-quantised vectors, rescored exactly")
@click.option(
    "--quantizer", type=click.Choice(["scalar", "binary"]), default=None,
    help="the quantised copy: scalar (int8) or binary (one bit per dimension, oversampled and rescored)",
)  # fmt: skip
def create(
    name: str, embedder: str | None, chunker: str | None, distance: str, sparse: bool, quantization: bool,
    quantizer: str | None,
) -> None:  # fmt: skip
    """Create a collection."""
    with remote(SERVICE):
        info = RetrievalClient().create(
            name,
            embedder=spec(embedder, "--embedder"),
            chunker=spec(chunker, "--chunker"),
            distance=distance,
            sparse=sparse,
            quantization=quantization,
            quantizer=quantizer or "",
        )
    console.print(info_line(info))


@group.command("list")
def list_collections() -> None:
    """Every collection, with its size."""
    with remote(SERVICE):
        for info in RetrievalClient().list_collections():
            console.print(info_line(info))


@group.command()
@click.argument("name")
def describe(name: str) -> None:
    """A collection's settings and size, as JSON."""
    with remote(SERVICE):
        info = RetrievalClient().describe(name)
    console.print_json(json_format.MessageToJson(info))


@group.command()
@click.argument("name")
def delete(name: str) -> None:
    """Drop a collection and its chunks."""
    with remote(SERVICE):
        deleted = RetrievalClient().delete(name)
    console.print(f"{name}: {'deleted' if deleted else 'not found'}")


@group.command()
@click.argument("name")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--chunker", help="chunker spec for these documents, JSON (default: the collection's)")
@click.option("--batch", default=16, show_default=True, help="documents sent per call")
def ingest(name: str, files: tuple[Path, ...], chunker: str | None, batch: int) -> None:
    """Ingest local files (their path is the document id and source); re-ingesting replaces them."""
    chunker_spec = spec(chunker, "--chunker")
    client, chunks = RetrievalClient(), 0
    columns = [TextColumn("ingest"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console) as progress, remote(SERVICE):
        task = progress.add_task("ingest", total=len(files))
        for start in range(0, len(files), batch):
            part = files[start : start + batch]
            documents = [pb.Document(id=str(f), text=f.read_text(encoding="utf-8"), source=str(f)) for f in part]
            chunks += client.ingest(name, documents, chunker_spec).chunks
            progress.advance(task, len(part))
    console.print(f"{name}: {len(files)} documents, {chunks} chunks")


@group.command("ingest-corpus")
@click.argument("name")
@click.argument("path")
@click.option("--pattern", "patterns", multiple=True, help="glob of files to take (repeatable)")
@click.option("--chunker", help="chunker spec, JSON (default: the collection's)")
def ingest_corpus(name: str, path: str, patterns: tuple[str, ...], chunker: str | None) -> None:
    """Ingest a folder of the artifact store on the server, with progress."""
    columns = [TextColumn("{task.fields[engine]}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console) as progress, remote(SERVICE):
        task = progress.add_task("ingest", total=None, engine="ingest")
        last = pb.IngestProgress()
        for last in RetrievalClient().ingest_corpus(name, path, patterns, spec(chunker, "--chunker")):
            progress.update(task, completed=last.documents_done, total=last.documents_total or None, engine=last.engine)
    console.print(f"{name}: {last.documents_done} documents, {last.chunks_done} chunks")


@group.command()
@click.argument("name")
@click.argument("query")
@click.option("-k", "--top-k", default=5, show_default=True)
@click.option("--mode", type=click.Choice(["dense", "sparse", "hybrid"]), default="dense", show_default=True)
@click.option("--filter", "filter_", help="Qdrant filter, JSON")
def search(name: str, query: str, top_k: int, mode: str, filter_: str | None) -> None:
    """The best chunks for a query."""
    with remote(SERVICE):
        hits = RetrievalClient().search(name, query, top_k=top_k, mode=mode, filter=spec(filter_, "--filter"))
    table = Table("score", "source", "chunk", "text")
    for h in hits:
        table.add_row(f"{h.score:.4f}", h.source, str(h.chunk_index), h.text[:100].replace("\n", " "))
    console.print(table)


@group.command()
@click.argument("name")
@click.argument("question")
@click.option("-k", "--top-k", default=5, show_default=True)
@click.option("--mode", type=click.Choice(["dense", "sparse", "hybrid"]), default="dense", show_default=True)
@click.option("--max-tokens", default=1024, show_default=True, help="budget of the context")
def context(name: str, question: str, top_k: int, mode: str, max_tokens: int) -> None:
    """The cited RAG prompt for a question: retrieved chunks numbered within a token budget."""
    request = pb.SearchRequest(collection=name, query=question, top_k=top_k, mode=mode)
    with remote(SERVICE):
        built = RetrievalClient().context(request, max_tokens=max_tokens)
    console.print(built.prompt, markup=False, highlight=False)
    for c in built.citations:
        console.print(f"[{c.number}] {c.source} ({c.start}-{c.end})", markup=False, highlight=False)
    console.print(f"{built.tokens} tokens, {built.dropped} hits left out")


@group.command()
@click.argument("texts", nargs=-1, required=True)
@click.option("--embedder", help='embedder spec, JSON (default {"type": "sentence_transformers"})')
def embed(texts: tuple[str, ...], embedder: str | None) -> None:
    """Embedding vectors of texts, one JSON list per line."""
    with remote(SERVICE):
        vectors = RetrievalClient().embed(list(texts), embedder=spec(embedder, "--embedder"))
    for vector in vectors:
        click.echo(json.dumps([round(v, 6) for v in vector]))
