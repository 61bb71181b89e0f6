"""The main job, on the local stack and embedded defaults: real corpora through every service.

1. Tokenisation (the seed's section 2): upload the Python standard library's source and its
   reference text, train the four tokeniser algorithms, compare how they split the seed's example
   sentence, and measure the vocabulary-size trade-off.
2. Retrieval (sections 3 and 6): embed Python's reference text into a hybrid collection, search
   it, and assemble a cited RAG context within a token budget.
3. Pretraining (section 4): a small Llama-style model on the reference text, on Ray Train.
4. Serving (section 7): the trained model loaded by the inference service and sampled.
Each stage runs only when its service is installed and up; a second run reuses what exists.
"""

from __future__ import annotations

import grpc
from rich.console import Console
from rich.table import Table

from libs.common import corpora
from libs.common.cli.rpc_errors import remote
from libs.common.cli.tokenizer import print_vocab_report, train_with_progress
from libs.common.clients.retrieval import RetrievalClient
from libs.common.clients.tokenizer import TokenizerClient
from libs.common.clients.training import TrainingClient
from libs.common.rpc.client import address, health_status

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


QUESTION = "How do I give a function parameter a default value?"

PRETRAIN = {
    "tokenizer": "demo-bpe",
    "corpus": ["pydoc"],
    "model_name": "demo-lm",
    "hidden_size": 128,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "seq_len": 128,
    "micro_batch_size": 8,
    "max_steps": 300,
    "warmup_steps": 30,
    "checkpoint_every": 100,
    "log_every": 25,
    "num_workers": 2,
}


def run(console: Console, fresh: bool = False) -> None:
    _tokenisation(console, fresh)
    if _up("retrieval"):
        _retrieval(console)
    if _up("training"):
        model = _pretraining(console)
        if model and _up("inference"):
            _serving(console, model)


def _up(service: str) -> bool:
    return health_status(address(service)) == "SERVING"


def _tokenisation(console: Console, fresh: bool) -> None:
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


def _retrieval(console: Console) -> None:
    from llmp.retrieval.v1 import retrieval_pb2 as rpb

    console.rule("retrieval")
    client = RetrievalClient()
    with remote("retrieval service"):
        if "pydoc" not in {c.name for c in client.list_collections()}:
            client.create("pydoc", sparse=True, chunker={"type": "recursive"})
            with console.status("embedding Python's reference text"):
                documents = [
                    rpb.Document(id=topic, text=text, source=f"pydoc:{topic}") for topic, text in corpora.pydoc_topics()
                ]
                reply = client.ingest("pydoc", documents)
            console.print(f"collection pydoc: {reply.chunks} chunks")
        hits = client.search("pydoc", QUESTION, top_k=3, mode="hybrid")
        search = rpb.SearchRequest(collection="pydoc", query=QUESTION, top_k=5, mode="hybrid")
        context = client.context(search, max_tokens=300)
    table = Table("score", "document", "passage", title=QUESTION)
    for hit in hits:
        table.add_row(f"{hit.score:.3f}", hit.document_id, hit.text[:90].replace("\n", " "))
    console.print(table)
    console.print(
        f"RAG context: {context.tokens} tokens, {len(context.citations)} citations "
        f"({', '.join(f'[{c.number}] {c.document_id}' for c in context.citations)})"
    )


def _pretraining(console: Console) -> str:
    console.rule("pretraining")
    tokenizers, training = TokenizerClient(), TrainingClient()
    with remote("training service"):
        if not tokenizers.exists("demo-bpe"):
            train_with_progress(tokenizers, "demo-bpe", "byte_level_bpe", 4000, ["pydoc"])
        job = training.submit("pretrain", PRETRAIN, client_token="demo-lm-1")
        console.print(
            f"job {job.job_id}: a {PRETRAIN['num_layers']}-layer Llama on pydoc, "
            f"{PRETRAIN['num_workers']} Ray Train workers (watch it on Ray's dashboard)"
        )
        for event in training.watch(job.job_id):
            p = event.progress
            if p.step:
                console.print(f"  step {p.step}/{p.total_steps}  loss {p.loss:.3f}  {p.tokens_per_second:.0f} tokens/s")
        final = training.get(job.job_id)
    if not final.model:
        console.print(f"[red]pretraining ended without a model[/]: {final.reason}")
        return ""
    console.print(f"registered {final.model}: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(final.metrics.items())))
    return final.model


def _serving(console: Console, model_ref: str) -> None:
    from llmp.inference.v1 import inference_pb2 as ipb
    from llmp.inference.v1 import inference_pb2_grpc as ipb_grpc

    from libs.common.rpc.client import channel

    console.rule("serving")
    with remote("inference service"):
        model = TrainingClient().model(model_ref)
        stub = ipb_grpc.InferenceServiceStub(channel(address("inference")))
        if "demo-lm" not in {m.name for m in stub.ListModels(ipb.ListModelsRequest()).models}:
            stub.LoadModel(ipb.LoadModelRequest(path=model.path, name="demo-lm"))
        for seed, prompt in enumerate(("The for statement", "A function definition")):
            reply = stub.Generate(
                ipb.GenerateRequest(model="demo-lm", text=prompt, max_tokens=40, temperature=0.8, top_p=0.95, seed=seed)
            )
            console.print(f"[bold]{prompt}[/]{reply.completions[0].text}")
