"""`llmp tokenizer ...`: train, import, inspect and use tokenisers through the running service (a gRPC client)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from google.protobuf import json_format
from llmp.tokenizer.v1 import tokenizer_pb2 as pb
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from libs.common import corpora
from libs.common.cli.rpc_errors import remote
from libs.common.clients.tokenizer import TokenizerClient

console = Console()


def train_with_progress(
    client: TokenizerClient, name: str, algorithm: str, vocab_size: int, corpus: list[str], **options: Any
) -> pb.TrainingStatus:
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[phase]}"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task(f"training {name} ({algorithm}, {vocab_size})", total=1.0, phase="queued")

        def show(status: pb.TrainingStatus) -> None:
            bar.update(task, completed=status.progress, phase=status.phase)

        with remote("tokenizer service"):
            final = client.train(name, algorithm, vocab_size, corpus=corpus, on_progress=show, **options)
    if final.state != pb.TrainingStatus.SUCCEEDED:
        raise click.ClickException(f"training {name} ended {pb.TrainingStatus.State.Name(final.state)}: {final.error}")
    console.print(f"[green]trained[/] {final.tokenizer} in {final.elapsed_seconds:.1f}s")
    return final


@click.group()
def group() -> None:
    """Tokenisers: train, import, encode, decode, compare vocabulary sizes."""


@group.command()
@click.argument("name")
@click.argument("paths", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("--stdlib", is_flag=True, help="add the Python standard library's source")
@click.option("--pydoc", is_flag=True, help="add Python's reference text (pydoc_data.topics)")
def upload(name: str, paths: tuple[Path, ...], stdlib: bool, pydoc: bool) -> None:
    """Upload text files (and built-in corpora) as corpus NAME."""
    documents: list[str] = [p.read_text(encoding="utf-8") for p in paths]
    documents += [text for _, text in corpora.stdlib_source()] if stdlib else []
    documents += [text for _, text in corpora.pydoc_topics()] if pydoc else []
    if not documents:
        raise click.UsageError("give files, --stdlib or --pydoc")
    with remote("tokenizer service"), console.status(f"uploading {len(documents)} documents"):
        reply = TokenizerClient().upload(name, documents)
    console.print(f"corpus {reply.corpus}: {reply.documents} documents, {reply.bytes / 1e6:.1f} MB")


@group.command()
@click.argument("name")
@click.option("--algorithm", "-a", default="byte_level_bpe", show_default=True)
@click.option("--vocab-size", "-v", default=32000, show_default=True)
@click.option("--corpus", "-c", multiple=True, required=True, help="corpus name or store path (repeatable)")
@click.option("--special", multiple=True, help="special tokens (repeatable; default: the algorithm's)")
@click.option("--chat-template", default="", help="'default' (ChatML) or a Jinja template")
@click.option("--min-frequency", default=0)
def train(
    name: str,
    algorithm: str,
    vocab_size: int,
    corpus: tuple[str, ...],
    special: tuple[str, ...],
    chat_template: str,
    min_frequency: int,
) -> None:
    """Train tokeniser NAME on corpora in the store."""
    train_with_progress(
        TokenizerClient(),
        name,
        algorithm,
        vocab_size,
        list(corpus),
        special_tokens=list(special),
        chat_template=chat_template,
        min_frequency=min_frequency,
    )


@group.command("import")
@click.argument("name")
@click.argument("path")
def import_(name: str, path: str) -> None:
    """Import a tokenizer.json, a Hugging Face tokenizer folder or a SentencePiece .model as NAME.

    A local file or folder is sent as bytes (the service reads no absolute paths of its caller);
    any other PATH is read in the service's artifact store."""
    request = _import_request(name, Path(path)) if Path(path).exists() else pb.ImportRequest(name=name, path=path)
    with remote("tokenizer service"):
        info = TokenizerClient().stub.Import(request)
    console.print(f"imported {info.ref}: {info.algorithm}, {info.vocab_size} tokens")


def _import_request(name: str, path: Path) -> pb.ImportRequest:
    """The request that carries a local tokenizer.json, .model, or a folder's tokenizer.json and chat template."""
    if path.is_file():
        fmt = "sentencepiece" if path.suffix == ".model" else "tokenizer.json"
        return pb.ImportRequest(name=name, data=path.read_bytes(), format=fmt)
    template = ""
    if (path / "tokenizer_config.json").is_file():
        template = json.loads((path / "tokenizer_config.json").read_text()).get("chat_template") or ""
    if (path / "tokenizer.json").is_file():
        data = (path / "tokenizer.json").read_bytes()
        return pb.ImportRequest(name=name, data=data, format="tokenizer.json", chat_template=str(template))
    models = sorted(path.glob("*.model"))
    if models:
        return pb.ImportRequest(
            name=name, data=models[0].read_bytes(), format="sentencepiece", chat_template=str(template)
        )
    raise click.ClickException(f"{path} holds no tokenizer.json or .model; copy it into the artifact store instead")


@group.command()
@click.argument("tokenizer")
@click.argument("text")
def encode(tokenizer: str, text: str) -> None:
    """Show how TOKENIZER splits TEXT."""
    with remote("tokenizer service"):
        enc = TokenizerClient().encode(tokenizer, text, return_tokens=True, return_offsets=True)
    table = Table("id", "token", "span")
    for i, t, o in zip(enc.ids, enc.tokens, enc.offsets, strict=True):
        table.add_row(str(i), repr(t), repr(text[o.start : o.end]))
    console.print(table)
    console.print(f"{len(enc.ids)} tokens for {len(text)} characters")


@group.command()
@click.argument("tokenizer")
@click.argument("ids", nargs=-1, type=int, required=True)
def decode(tokenizer: str, ids: tuple[int, ...]) -> None:
    """Turn token IDS back into text."""
    with remote("tokenizer service"):
        console.print(TokenizerClient().decode(tokenizer, list(ids)))


@group.command("list")
def list_() -> None:
    """List every tokeniser version in the store."""
    with remote("tokenizer service"):
        infos = TokenizerClient().list_tokenizers()
    table = Table("ref", "algorithm", "vocab", "source", "chat", "created")
    for i in infos:
        table.add_row(
            i.ref, i.algorithm, str(i.vocab_size), i.source, "yes" if i.has_chat_template else "-", i.created_at
        )
    console.print(table)


@group.command()
@click.argument("tokenizer")
def describe(tokenizer: str) -> None:
    """Everything recorded about one tokeniser version."""
    with remote("tokenizer service"):
        info = TokenizerClient().describe(tokenizer)
    table = Table("field", "value", title=info.ref)
    for name, value in json_format.MessageToDict(info, preserving_proto_field_name=True).items():
        if name != "chat_template":
            table.add_row(name, ", ".join(value) if isinstance(value, list) else str(value))
    console.print(table)


@group.command()
@click.argument("tokenizer")
def delete(tokenizer: str) -> None:
    """Delete one version (name:3) or all versions (name)."""
    with remote("tokenizer service"):
        deleted = TokenizerClient().stub.Delete(pb.DeleteRequest(tokenizer=tokenizer)).deleted
    console.print(f"deleted {', '.join(deleted)}")


@group.command()
@click.option("--corpus", "-c", multiple=True, required=True)
@click.option("--algorithm", "-a", default="byte_level_bpe", show_default=True)
@click.option("--sizes", default="1000,4000,16000,32000", show_default=True)
@click.option("--dim", default=4096, show_default=True, help="model width for the embedding table")
def report(corpus: tuple[str, ...], algorithm: str, sizes: str, dim: int) -> None:
    """The vocabulary-size trade-off: compression against embedding-table size."""
    print_vocab_report(TokenizerClient(), list(corpus), algorithm, [int(s) for s in sizes.split(",")], dim)


def print_vocab_report(client: TokenizerClient, corpus: list[str], algorithm: str, sizes: list[int], dim: int) -> None:
    table = Table(
        "vocab",
        "learned",
        "tokens/char",
        "tokens/byte",
        "chars/token",
        "embedding params",
        "bf16 MB",
        title=f"{algorithm} on {', '.join(corpus)} (held-out 10%), d_model={dim}",
    )
    with remote("tokenizer service"), console.status("training one tokeniser per size"):
        for row in client.vocab_report(algorithm, sizes, corpus=corpus, embedding_dim=dim):
            table.add_row(
                str(row.vocab_size),
                str(row.actual_vocab_size),
                f"{row.tokens_per_char:.3f}",
                f"{row.tokens_per_byte:.3f}",
                f"{row.chars_per_token:.2f}",
                f"{row.embedding_params:,}",
                f"{row.embedding_bytes / 1e6:.0f}",
            )
    console.print(table)
