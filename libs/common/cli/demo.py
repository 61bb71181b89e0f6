"""The main job, on the local stack and embedded defaults: real corpora through the services.

Tokenisation (the seed's section 2): upload the Python standard library's source and its
reference text, train the four tokeniser algorithms, compare how they split the seed's example
sentence, and measure the vocabulary-size trade-off. Later stages join as their services land.
"""

from __future__ import annotations

import grpc
from rich.console import Console
from rich.table import Table

from libs.common import corpora
from libs.common.cli.rpc_errors import remote
from libs.common.cli.tokenizer import print_vocab_report, train_with_progress
from libs.common.clients.tokenizer import TokenizerClient

EXAMPLE = "The transformer architecture revolutionised natural language processing."

CORPORA = {
    "stdlib": lambda: (text for _, text in corpora.stdlib_source()),
    "pydoc": lambda: (text for _, text in corpora.pydoc_topics()),
}

TOKENIZERS = [
    # name, algorithm, vocabulary size, corpora, options
    ("code-bpe", "byte_level_bpe", 32000, ["stdlib", "pydoc"], {"chat_template": "default"}),
    ("doc-bpe", "bpe", 8000, ["pydoc"], {}),
    ("doc-wordpiece", "wordpiece", 8000, ["pydoc"], {}),
    ("doc-unigram", "unigram", 8000, ["pydoc"], {}),
]


def _upload_corpora(console: Console, client: TokenizerClient) -> None:
    for name, documents in CORPORA.items():
        try:
            with console.status(f"uploading corpus {name}"):
                reply = client.upload(name, documents())
            console.print(f"corpus {name}: {reply.documents} documents, {reply.bytes / 1e6:.1f} MB")
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
            console.print(f"corpus {name}: already in the store")


def run(console: Console, fresh: bool = False) -> None:
    client = TokenizerClient()
    console.rule("tokenisation")
    with remote("tokenizer service"):
        _upload_corpora(console, client)
    for name, algorithm, size, corpus, options in TOKENIZERS:
        with remote("tokenizer service"):
            exists = client.exists(name)
        if exists and not fresh:
            console.print(f"{name}: already trained (llmp demo --fresh trains a new version)")
            continue
        train_with_progress(client, name, algorithm, size, corpus, **options)

    table = Table("tokenizer", "tokens", "pieces", title=EXAMPLE)
    with remote("tokenizer service"):
        for name, *_ in TOKENIZERS:
            enc = client.encode(name, EXAMPLE, return_tokens=True)
            table.add_row(name, str(len(enc.ids)), " ".join(enc.tokens))
    console.print(table)
    print_vocab_report(client, ["stdlib"], "byte_level_bpe", [4000, 16000, 32000, 64000], 4096)
