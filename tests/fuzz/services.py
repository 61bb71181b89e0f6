"""The services under fuzz, each a real process on a free port, with a real request of its own.

Each `Target` starts its service (and what it needs: Redis for training, the tokeniser service
for training's checks), gives the fuzzer the words that get random calls past the first check
(its collection, tokeniser and model names, plugin types), and knows one real request and its
correct answer. The real request reads things of its own ("real-..."), which the fuzzer's words
never name, so a random Delete or Unload may remove the fuzzer's copies but not those.
`Companion` sends that request over and over beside the fuzzer: a service that answers it
wrongly, slowly past its deadline or not at all while random calls hit it fails.

Caps are set as an operator of a small machine would set them (small documents, few tokens per
completion), so the work a random but valid call may start stays within a call's deadline on
two cores; what is tested is that every such size is capped, and the caps are settings.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from libs.common.structs import to_struct
from tests.helpers.services import ServiceProcess, start_service

REAL_DEADLINE_S = 60.0


@dataclass
class Target:
    name: str
    descriptor: ServiceDescriptor
    process: ServiceProcess
    words: list[str]
    #: One real request: sends it on a channel and returns its answer (comparable with ==).
    real: Callable[[grpc.Channel], Any]
    expected: Any = None
    others: list[Any] = field(default_factory=list)  # processes it depends on, stopped after it
    #: A valid request per method (by name), which the fuzzer also mutates a field or two at a time.
    bases: dict[str, Any] = field(default_factory=dict)
    #: Puts back what the fuzzer's calls may have removed (its collection, its model), before each RPC.
    restore: Callable[[grpc.Channel], None] | None = None

    def stop(self) -> None:
        self.process.stop()
        for other in self.others:
            other.stop()


class Companion(threading.Thread):
    """Sends a target's real request in a loop; records every wrong or failed answer."""

    def __init__(self, target: Target) -> None:
        super().__init__(name=f"companion-{target.name}", daemon=True)
        self.target = target
        self.done = 0
        self.failures: list[str] = []
        self._stop_event = threading.Event()
        self._channel = grpc.insecure_channel(target.process.address)

    def check_once(self) -> None:
        try:
            answer = self.target.real(self._channel)
        except grpc.RpcError as e:
            self.failures.append(f"{e.code().name}: {e.details()}")
            return
        if answer != self.target.expected:
            self.failures.append(f"wrong answer {answer!r}, expected {self.target.expected!r}")
        self.done += 1

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.check_once()
            self._stop_event.wait(0.05)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(REAL_DEADLINE_S)
        self._channel.close()


def tokenizer(home: Path) -> Target:
    from llmp.tokenizer.v1 import tokenizer_pb2 as pb

    from libs.common import corpora
    from libs.common.clients.tokenizer import TokenizerClient

    env = {"LLMP_TOKENIZER_MAX_TEXT_BYTES": str(1 << 20), "LLMP_TOKENIZER_MAX_REPORT_BYTES": str(2 << 20)}
    process = start_service("tokenizer", home, env)
    client = TokenizerClient(process.address)
    client.upload("fuzz-corpus", [text for _, text in list(corpora.pydoc_topics())[:40]])

    def train(ch: grpc.Channel, name: str = "fuzz-bpe") -> None:
        trainer = TokenizerClient(ch=ch)
        if not trainer.exists(name):
            trained = trainer.train(name, "bpe", 800, corpus=["fuzz-corpus"], chat_template="default")
            assert trained.state == trained.SUCCEEDED, trained.error

    for name in ("real-bpe", "fuzz-bpe"):
        train(client.channel, name)
    client.close()

    def real(ch: grpc.Channel) -> Any:
        stub = _stub(ch, pb, "TokenizerService")
        request = pb.EncodeRequest(tokenizer="real-bpe", text="The with statement is used to wrap a block.")
        return list(stub.Encode(request, timeout=REAL_DEADLINE_S).ids)

    words = ["fuzz-bpe", "fuzz-bpe:1", "fuzz-corpus", "bpe", "byte_level_bpe", "wordpiece", "unigram", "default"]
    words += ["user", "assistant", "system", "right", "left", "longest_first", "tokenizer.json", "sentencepiece"]
    text = "The with statement is used to wrap the execution of a block."
    options = {"truncation": pb.TruncationOptions(max_length=8, stride=2), "padding": pb.PaddingOptions(length=8)}
    bases = {
        "Train": pb.TrainRequest(name="fuzz-trained", algorithm="bpe", vocab_size=120, texts=[text] * 3),
        "Encode": pb.EncodeRequest(tokenizer="fuzz-bpe", text=text, return_offsets=True, **options),
        "EncodeBatch": pb.EncodeBatchRequest(tokenizer="fuzz-bpe", texts=[text, "a b"], **options),
        "EncodeStream": pb.EncodeRequest(tokenizer="fuzz-bpe", text=text),
        "Decode": pb.DecodeRequest(tokenizer="fuzz-bpe", ids=[5, 6, 7]),
        "CountTokens": pb.CountTokensRequest(tokenizer="fuzz-bpe", texts=[text]),
        "ApplyChatTemplate": pb.ApplyChatTemplateRequest(
            tokenizer="fuzz-bpe", messages=[pb.ChatMessage(role="user", content=text)], add_generation_prompt=True
        ),
        "UploadCorpus": pb.CorpusChunk(name="fuzz-upload", text=text, new_document=True),
        "VocabReport": pb.VocabReportRequest(texts=[text] * 20, algorithm="bpe", vocab_sizes=[100, 120]),
    }
    service = pb.DESCRIPTOR.services_by_name["TokenizerService"]
    return _with_expected(Target("tokenizer", service, process, words, real, bases=bases, restore=train))


def retrieval(home: Path) -> Target:
    from llmp.retrieval.v1 import retrieval_pb2 as pb

    from libs.common.clients.retrieval import RetrievalClient

    env = {"LLMP_RETRIEVAL_RAY": "off", "LLMP_RETRIEVAL_MAX_DOCUMENT_BYTES": str(64 << 10)}
    env |= {"LLMP_RETRIEVAL_MAX_BATCH": "64", "LLMP_RETRIEVAL_MAX_INGEST_CHUNKS": "256"}
    process = start_service("retrieval", home, env)
    client = RetrievalClient(process.address)
    # The first sentence-transformers load imports its libraries (a minute on a busy machine): done here,
    # so a random CreateCollection or Embed that names it measures the service, not Python's imports.
    client.embed(["warm up"], embedder={"type": "sentence_transformers"})
    documents = [
        pb.Document(id="with", text="The with statement wraps a block with methods of a context manager."),
        pb.Document(id="loops", text="The for statement iterates over the elements of a sequence."),
        pb.Document(id="errors", text="The try statement specifies exception handlers for a group of statements."),
    ]

    def create(ch: grpc.Channel, name: str = "docs") -> None:
        stub = _stub(ch, pb, "RetrievalService")
        if name in [c.name for c in stub.ListCollections(pb.ListCollectionsRequest(), timeout=60).collections]:
            return
        spec = to_struct({"type": "static"})
        stub.CreateCollection(pb.CreateCollectionRequest(name=name, embedder=spec, sparse=True), timeout=120)
        stub.Ingest(pb.IngestRequest(collection=name, documents=documents), timeout=120)

    for name in ("real-docs", "docs"):
        create(client.channel, name)
    client.close()

    def real(ch: grpc.Channel) -> Any:
        stub = _stub(ch, pb, "RetrievalService")
        request = pb.SearchRequest(collection="real-docs", query="exception handlers in a try statement", top_k=2)
        return [h.document_id for h in stub.Search(request, timeout=REAL_DEADLINE_S).hits]

    words = ["docs", "with", "loops", "static", "bm25", "fixed", "recursive", "sentences", "dense", "sparse"]
    words += ["hybrid", "cosine", "dot", "euclid", "local", "auto", "text", "markdown", "code", "document_id"]
    mmr = pb.MmrOptions(diversity=0.5)
    search = pb.SearchRequest(collection="docs", query="a statement", top_k=2, mode="hybrid", mmr=mmr)
    bases = {
        "Embed": pb.EmbedRequest(texts=["a statement"], embedder=to_struct({"type": "static"})),
        "CreateCollection": pb.CreateCollectionRequest(name="fuzz-new", embedder=to_struct({"type": "static"})),
        "Ingest": pb.IngestRequest(
            collection="docs",
            documents=[pb.Document(id="fuzz-doc", text=documents[0].text)],
            chunker=to_struct({"type": "fixed", "size": 8, "overlap": 2}),
        ),
        "Search": search,
        "BuildContext": pb.BuildContextRequest(search=search, max_tokens=200),
    }
    service = pb.DESCRIPTOR.services_by_name["RetrievalService"]
    return _with_expected(Target("retrieval", service, process, words, real, bases=bases, restore=create))


def training(home: Path, tokenizer_target: Target) -> Target:
    from llmp.training.v1 import training_pb2 as pb

    from tests.helpers.redis_server import RedisServer

    (home / "redis").mkdir()
    redis = RedisServer(home / "redis").start()
    env = {
        "LLMP_REDIS_URL": redis.url,
        "LLMP_TOKENIZER_ADDRESS": tokenizer_target.process.address,
        "LLMP_TRAINING_RAY_NUM_CPUS": "1",
        "LLMP_TRAINING_RAY_DASHBOARD": "false",
        "LLMP_TRAINING_DRAIN_SECONDS": "10",
        "RAY_gcs_server_port_wait_time_s": "180",
    }
    try:
        process = start_service("training", home, env)
    except BaseException:
        redis.stop()
        raise

    def real(ch: grpc.Channel) -> Any:
        stub = _stub(ch, pb, "TrainingService")
        models = stub.ListModels(pb.ListModelsRequest(), timeout=REAL_DEADLINE_S).models
        return sorted(m.ref for m in models)

    words = ["pretrain", "mlm", "sweep", "distill", "prepare", "sft", "reward", "dpo", "grpo", "fuzz-bpe"]
    words += ["tokenizer", "corpus", "model_name", "max_steps", "num_workers", "seq_len"]
    # Valid but for its corpus, which lives in the tokeniser's store and not in this service's: the
    # checks run to the end (the tokeniser service is asked) and no Ray work starts.
    config = {"tokenizer": "fuzz-bpe", "corpus": ["fuzz-corpus"], "model_name": "fuzz"}
    config |= {"max_steps": 5, "warmup_steps": 1}
    config |= {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "seq_len": 32, "num_workers": 1}
    bases = {"SubmitJob": pb.SubmitJobRequest(type="pretrain", config=to_struct(config))}
    service = pb.DESCRIPTOR.services_by_name["TrainingService"]
    target = Target("training", service, process, words, real, bases=bases)
    target.others.append(redis)
    return _with_expected(target)


def inference(home: Path) -> Target:
    from llmp.inference.v1 import inference_pb2 as pb

    from tests.helpers.tiny_models import TINY, save_tiny_model

    save_tiny_model(home / "artifacts")
    env = {"LLMP_INFERENCE_BACKEND": "local", "LLMP_INFERENCE_MAX_TOKENS": "64", "LLMP_INFERENCE_MAX_N": "4"}
    process = start_service("inference", home, env)

    def load(ch: grpc.Channel, name: str = "tiny") -> None:
        stub = _stub(ch, pb, "InferenceService")
        if name not in [m.name for m in stub.ListModels(pb.ListModelsRequest(), timeout=60).models]:
            stub.LoadModel(pb.LoadModelRequest(path=TINY, name=name), timeout=300)

    with grpc.insecure_channel(process.address) as ch:
        for name in ("real-tiny", "tiny"):
            load(ch, name)

    def real(ch: grpc.Channel) -> Any:
        stub = _stub(ch, pb, "InferenceService")
        request = pb.GenerateRequest(
            model="real-tiny", token_ids=pb.TokenIds(ids=[5, 17, 99, 3]), max_tokens=8, temperature=0, ignore_eos=True
        )
        return list(stub.Generate(request, timeout=REAL_DEADLINE_S).completions[0].token_ids)

    words = ["tiny", "true", "false", "never"]
    generate = pb.GenerateRequest(model="tiny", token_ids=pb.TokenIds(ids=[5, 17, 99, 3]), max_tokens=4, temperature=0)
    bases = {"Generate": generate, "GenerateStream": generate}
    service = pb.DESCRIPTOR.services_by_name["InferenceService"]
    return _with_expected(Target("inference", service, process, words, real, bases=bases, restore=load))


def _stub(ch: grpc.Channel, pb: Any, service: str) -> Any:
    import importlib

    grpc_module = importlib.import_module(pb.__name__ + "_grpc")
    return getattr(grpc_module, f"{service}Stub")(ch)


def _with_expected(target: Target) -> Target:
    """The real request's answer on the idle service: what every later answer must equal."""
    with grpc.insecure_channel(target.process.address) as ch:
        target.expected = target.real(ch)
    return target


CALLS: Counter[tuple[str, str]] = Counter()
"""Calls made in the session, per (RPC, status code): the report's figures."""


class Targets:
    """Services started on first use and stopped at the session's end, companions first."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: dict[str, tuple[Target, Companion]] = {}

    def get(self, name: str) -> tuple[Target, Companion]:
        if name not in self.started:
            home = self.root / name
            home.mkdir()
            if name == "training":
                target = training(home, self.get("tokenizer")[0])
            else:
                target = {"tokenizer": tokenizer, "retrieval": retrieval, "inference": inference}[name](home)
            companion = Companion(target)
            companion.start()
            self.started[name] = (target, companion)
        return self.started[name]

    def close(self) -> None:
        for name in ("training", "retrieval", "inference", "tokenizer"):
            if name in self.started:
                target, companion = self.started.pop(name)
                companion.stop()
                target.stop()
