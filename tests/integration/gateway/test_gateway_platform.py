"""The platform API through the real gateway in front of real services: tokenisers (upload,
train with progress, import by upload, encode, decode), collections (create, ingest, ingest an
uploaded corpus with progress, search), served models, the RAG answer (REST, streamed, gRPC)
equal to running its steps by hand, and the backends' own gRPC services through the gateway
(the `llmp` command line with --gateway), where naming a server path is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from llmp.retrieval.v1 import retrieval_pb2 as rpb
from llmp.tokenizer.v1 import tokenizer_pb2 as tpb

from libs.common.clients.gateway import GatewayClient
from libs.common.clients.inference import InferenceClient
from libs.common.clients.retrieval import RetrievalClient
from libs.common.clients.tokenizer import TokenizerClient
from tests.helpers.services import ROOT
from tests.integration.gateway.stack import TINY, GatewayStack, call, create_key

pytestmark = pytest.mark.integration

DOCS = {
    "kv": "The KV cache keeps the keys and values of past tokens so decoding does not recompute them.",
    "bpe": "Byte-pair encoding merges the most frequent pair of symbols again and again.",
    "rag": "Retrieval-augmented generation puts retrieved passages in the prompt and cites them.",
}


def sse(stack: GatewayStack, path: str, key: str, body: Any = None, method: str = "POST") -> list[dict[str, Any]]:
    """Every event of a server-sent stream, in order."""
    headers = {"authorization": f"Bearer {key}"}
    with httpx.Client(timeout=120) as http, http.stream(method, stack.http + path, json=body, headers=headers) as r:
        assert r.status_code == 200, r.read()
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]


@pytest.fixture(scope="module")
def collection(full_stack: GatewayStack) -> str:
    key = full_stack.admin_key
    status, _, body = call(full_stack, "POST", "/api/v1/collections", key, {"name": "notes", "sparse": True})
    assert status == 201, body
    documents = [{"id": k, "text": v, "source": f"{k}.md"} for k, v in DOCS.items()]
    status, _, body = call(full_stack, "POST", "/api/v1/collections/notes/documents", key, {"documents": documents})
    assert status == 200 and [d["id"] for d in body["documents"]] == list(DOCS)
    return "notes"


def test_tokenizers_upload_train_watch_encode_decode(full_stack: GatewayStack) -> None:
    key = create_key(full_stack, ["tokenizer"])
    corpus = {"name": "notes-corpus", "documents": list(DOCS.values()) * 20}
    assert call(full_stack, "POST", "/api/v1/corpora", key, corpus)[0] == 201
    status, _, started = call(
        full_stack, "POST", "/api/v1/tokenizers", key,
        {"name": "notes-bpe", "algorithm": "bpe", "vocab_size": 300, "corpus": ["notes-corpus"]},
    )  # fmt: skip
    assert status == 202
    events = sse(full_stack, f"/api/v1/tokenizers/jobs/{started['job_id']}/watch", key, method="GET")
    assert events[-1]["state"] == "SUCCEEDED" and events[-1]["tokenizer"] == "notes-bpe:1"
    status, _, enc = call(full_stack, "POST", "/api/v1/tokenizers/notes-bpe/encode", key, {"text": "the KV cache"})
    assert status == 200 and enc["ids"] and len(enc["tokens"]) == len(enc["ids"])
    status, _, dec = call(full_stack, "POST", "/api/v1/tokenizers/notes-bpe/decode", key, {"ids": enc["ids"]})
    assert status == 200 and dec["text"].replace(" ", "") == "theKVcache"
    data = (full_stack.home / "artifacts" / TINY / "tokenizer.json").read_bytes()
    status, _, info = call(full_stack, "PUT", "/api/v1/tokenizers/bytes?format=tokenizer.json", key, raw=data)
    assert status == 201 and info["ref"] == "bytes:1" and info["vocab_size"] == 256
    names = [t["name"] for t in call(full_stack, "GET", "/api/v1/tokenizers", key)[2]["tokenizers"]]
    assert {"notes-bpe", "bytes"} <= set(names)


def test_collections_search_and_corpus_ingest_with_progress(full_stack: GatewayStack, collection: str) -> None:
    key = create_key(full_stack, ["retrieval"])
    status, _, found = call(
        full_stack, "POST", f"/api/v1/collections/{collection}/search", key, {"query": "cache of keys", "top_k": 2}
    )
    assert status == 200 and found["hits"][0]["document_id"] == "kv"
    admin = full_stack.admin_key
    upload = {"name": "more-notes", "documents": [f"Note {i}: tokens and caches." for i in range(5)]}
    assert call(full_stack, "POST", "/api/v1/corpora", admin, upload)[0] == 201
    assert call(full_stack, "POST", "/api/v1/collections", key, {"name": "more"})[0] == 201
    events = sse(full_stack, "/api/v1/collections/more/corpus", key, {"corpus": "more-notes"})
    last = events[-1]  # the uploaded corpus is one text shard: one document for retrieval
    assert last["documents_done"] == last["documents_total"] == 1 and last["chunks_done"] >= 1
    assert call(full_stack, "GET", "/api/v1/collections/more", key)[2]["points"] == last["chunks_done"]
    status, _, body = call(full_stack, "POST", "/api/v1/collections/more/corpus", key, {"corpus": "../../etc"})
    assert status == 400 and body["error"]["param"] == "corpus"


def test_a_collection_is_created_with_a_quantizer_or_refused_naming_it(full_stack: GatewayStack) -> None:
    key = create_key(full_stack, ["retrieval"])
    status, _, body = call(full_stack, "POST", "/api/v1/collections", key, {"name": "bits", "quantizer": "binary"})
    assert status == 201 and body["spec"]["quantization"] == "binary", body
    status, _, described = call(full_stack, "GET", "/api/v1/collections/bits", key)
    assert status == 200 and described["spec"]["quantization"] == "binary"
    scalar = {"name": "bytes-q", "quantization": True}
    assert call(full_stack, "POST", "/api/v1/collections", key, scalar)[2]["spec"]["quantization"] == "scalar"
    status, _, body = call(full_stack, "POST", "/api/v1/collections", key, {"name": "pq", "quantizer": "pq"})
    assert status == 400 and body["error"]["param"] == "quantizer", body
    assert call(full_stack, "GET", "/api/v1/collections/pq", key)[0] == 404


def test_the_answer_is_retrieval_then_generation_with_citations(full_stack: GatewayStack, collection: str) -> None:
    key = create_key(full_stack, ["retrieval", "inference"])
    ask = {"collection": collection, "question": "What does the KV cache keep?", "model": "tiny",
           "top_k": 2, "context_tokens": 120, "max_tokens": 16}  # fmt: skip
    status, _, answer = call(full_stack, "POST", "/api/v1/answer", key, ask)
    assert status == 200, answer
    assert [c["number"] for c in answer["citations"]] == [1, 2] and answer["citations"][0]["document_id"] == "kv"
    assert answer["usage"]["completion_tokens"] == 16 and answer["context_tokens"] <= 120
    # the same steps by hand, on the services directly
    retrieval = RetrievalClient(full_stack.services["retrieval"].address)
    search = rpb.SearchRequest(collection=collection, query=ask["question"], top_k=2)
    context = retrieval.context(search, max_tokens=120)
    inference = InferenceClient(full_stack.services["inference"].address)
    direct = inference.generate("tiny", text=context.prompt, max_tokens=16, temperature=0)
    assert answer["answer"] == direct.completions[0].text
    events = sse(full_stack, "/api/v1/answer", key, {**ask, "stream": True})
    assert events[0]["citations"] == answer["citations"]
    assert "".join(e.get("text", "") for e in events[1:]) == answer["answer"]
    over_grpc = GatewayClient(full_stack.gateway.address, key=key).answer(
        collection, ask["question"], "tiny", top_k=2, context_tokens=120, max_tokens=16
    )
    assert over_grpc.text == answer["answer"] and over_grpc.citations[0].document_id == "kv"
    retrieval.close()
    inference.close()
    only_retrieval = create_key(full_stack, ["retrieval"])
    assert call(full_stack, "POST", "/api/v1/answer", only_retrieval, ask)[0] == 403


def test_an_answer_is_fitted_to_the_model_or_refused_with_nothing_to_cite(
    full_stack: GatewayStack, collection: str
) -> None:
    key = create_key(full_stack, ["retrieval", "inference"])
    ask = {"collection": collection, "question": "What does the KV cache keep?", "model": "tiny", "top_k": 2}
    # a budget far past the model's 1024 tokens: the context shrinks until prompt and answer fit
    fitted = {**ask, "context_tokens": 1 << 16, "max_tokens": 400}
    status, _, answer = call(full_stack, "POST", "/api/v1/answer", key, fitted)
    assert status == 200, answer
    assert answer["citations"] and answer["usage"]["prompt_tokens"] + answer["usage"]["completion_tokens"] <= 1024
    # no room for any chunk beside the answer: refused, not answered uncited
    crowded = {**ask, "context_tokens": 1 << 16, "max_tokens": 1000}
    status, _, body = call(full_stack, "POST", "/api/v1/answer", key, crowded)
    assert status == 400 and body["error"]["param"] == "context_tokens", body


def test_served_models_load_quantised_and_unload(full_stack: GatewayStack) -> None:
    key = full_stack.admin_key
    status, _, body = call(
        full_stack, "POST", "/api/v1/served", key, {"path": TINY, "name": "tiny-int8", "quantization": "int8"}
    )
    assert status == 201 and body["quantization"] == "int8"
    assert {m["name"] for m in call(full_stack, "GET", "/api/v1/served", key)[2]["models"]} == {"tiny", "tiny-int8"}
    assert call(full_stack, "DELETE", "/api/v1/served/tiny-int8", key)[0] == 200
    status, _, body = call(full_stack, "POST", "/api/v1/served", key, {"path": "/etc", "name": "x"})
    assert status == 400 and body["error"]["param"] == "path"
    # the training service is not running: its routes answer 503 at once, the rest keep working
    status, _, body = call(full_stack, "POST", "/api/v1/served", key, {"model": "tiny:1"})
    assert status == 503 and "training" in body["error"]["message"]
    assert call(full_stack, "GET", "/api/v1/jobs", key)[0] == 503
    assert call(full_stack, "GET", "/v1/models", key)[0] == 200


def test_backend_services_over_the_gateways_grpc_with_a_key(
    full_stack: GatewayStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = create_key(full_stack, ["tokenizer"])
    monkeypatch.setenv("LLMP_API_KEY", key)
    through = TokenizerClient(full_stack.gateway.address)
    direct = TokenizerClient(full_stack.services["tokenizer"].address)
    assert [t.ref for t in through.list_tokenizers()] == [t.ref for t in direct.list_tokenizers()]
    assert list(through.encode("bytes", "héllo").ids) == list(direct.encode("bytes", "héllo").ids)
    before = len(direct.list_tokenizers())
    with pytest.raises(grpc.RpcError) as e:
        through.stub.Import(tpb.ImportRequest(name="stolen", path="/etc/hostname"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "path" in e.value.details()
    assert len(direct.list_tokenizers()) == before
    monkeypatch.setenv("LLMP_API_KEY", create_key(full_stack, ["inference"]))
    with pytest.raises(grpc.RpcError) as e:
        through.list_tokenizers()
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    through.close()
    direct.close()


def test_llmp_command_line_through_the_gateway(full_stack: GatewayStack) -> None:
    env = {**os.environ, "LLMP_HOME": str(full_stack.home), "COLUMNS": "250"}
    env.pop("LLMP_API_KEY", None)  # the admin key file under LLMP_HOME is used
    argv = [str(Path(sys.executable).parent / "llmp"), "--gateway", full_stack.gateway.address, "tokenizer", "list"]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "bytes:1" in done.stdout
    env["LLMP_API_KEY"] = "llmp_bad_key"
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "UNAUTHENTICATED" in done.stdout + done.stderr
