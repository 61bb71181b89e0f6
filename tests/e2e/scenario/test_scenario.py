"""The life of a model through the gateway, on the local stack or the kind cluster (LLMP_E2E_TARGET):
train a tokeniser, pretrain a tiny model (a RayJob on kind), find it registered, serve it, chat with
it through the OpenAI client, ingest documents and get a RAG answer with citations. On kind also a
connection that a NetworkPolicy must refuse.

    LLMP_E2E_TARGET=kind .venv/bin/python -m pytest tests/e2e/scenario     # after make kind-up
"""

from __future__ import annotations

from typing import Any

import pytest

from libs.common.corpora import pydoc_topics
from tests.e2e.scenario.targets import TARGET, Gateway, Target

pytestmark = [pytest.mark.e2e, pytest.mark.slow] + ([pytest.mark.kind] if TARGET == "kind" else [])

CORPUS, TOKENIZER, MODEL, COLLECTION = "scenario-docs", "scenario-bpe", "scenario-tiny", "scenario-docs"
PRETRAIN = {
    "tokenizer": TOKENIZER,
    "corpus": [CORPUS],
    "model_name": MODEL,
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "seq_len": 256,  # room for a RAG prompt: template, question and a cited context
    "micro_batch_size": 4,
    "max_steps": 20,
    "warmup_steps": 2,
    "checkpoint_every": 10,
    "num_workers": 1,
}


@pytest.fixture(scope="module")
def topics() -> list[tuple[str, str]]:
    """Python's reference text: 40 topics, (name, text)."""
    return list(pydoc_topics())[:40]


def test_unauthenticated_calls_are_refused(target: Target, gateway: Gateway) -> None:
    import httpx

    assert httpx.get(f"{target.base_url}/health", timeout=30).status_code == 200
    assert httpx.get(f"{target.base_url}/v1/models", timeout=30).status_code == 401
    bad = httpx.get(f"{target.base_url}/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert bad.status_code == 401


def test_the_life_of_a_model(target: Target, gateway: Gateway, topics: list[tuple[str, str]]) -> None:
    # a corpus, and a byte-level BPE with a chat template trained on it
    uploaded = gateway.call("POST", "/corpora", {"name": CORPUS, "documents": [t for _, t in topics]}, expect=201)
    assert uploaded["documents"] == len(topics)
    train = {
        "name": TOKENIZER,
        "algorithm": "byte_level_bpe",
        "vocab_size": 512,
        "corpus": [CORPUS],
        "chat_template": "default",
    }
    job = gateway.call("POST", "/tokenizers", train, expect=202)
    progress = gateway.events("GET", f"/tokenizers/jobs/{job['job_id']}/watch")
    assert progress[-1]["state"] == "SUCCEEDED", progress[-1]
    assert gateway.call("GET", f"/tokenizers/{TOKENIZER}")["vocab_size"] <= 512

    # a tiny pretraining job (on kind: a RayJob the training service creates)
    job = gateway.call(
        "POST", "/jobs", {"type": "pretrain", "config": PRETRAIN, "client_token": "scenario"}, expect=202
    )
    gateway.events("GET", f"/jobs/{job['job_id']}/watch")
    final = gateway.call("GET", f"/jobs/{job['job_id']}")
    assert final["state"] == "SUCCEEDED", final.get("reason")
    assert final["backend"] == ("kuberay" if target.name == "kind" else "local_ray")

    # registered with its lineage, then served
    registered = gateway.call("GET", f"/models/{MODEL}:latest")
    assert registered["path"] and final["model"].startswith(f"{MODEL}:")
    loaded = gateway.call(
        "POST", "/served", {"model": f"{MODEL}:latest", "name": MODEL, "kv_cache_bytes": 16 << 20}, expect=201
    )
    assert loaded["name"] == MODEL
    served = gateway.call("GET", "/served")["models"]
    assert MODEL in {m["name"] for m in served}

    # chat through the OpenAI-compatible API with the openai client
    from openai import OpenAI

    client = OpenAI(base_url=f"{target.base_url}/v1", api_key=target.admin_key)
    assert MODEL in {m.id for m in client.models.list()}
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is a list?"}], max_tokens=8, temperature=0
    )
    assert chat.choices[0].message.content is not None and chat.usage.completion_tokens >= 1

    # documents in, and an answer that cites them
    gateway.call("POST", "/collections", {"name": COLLECTION}, expect=201)
    documents = [{"id": name, "text": text, "source": f"pydoc:{name}"} for name, text in topics[:20]]
    gateway.call("POST", f"/collections/{COLLECTION}/documents", {"documents": documents})
    answer: dict[str, Any] = gateway.call(
        "POST",
        "/answer",
        {
            "collection": COLLECTION,
            "model": MODEL,
            "question": "How do I define a function?",
            "max_tokens": 16,
            "top_k": 3,
        },
    )
    assert isinstance(answer["answer"], str) and answer["usage"]["completion_tokens"] >= 1
    cited = {c["document_id"] for c in answer["citations"]}
    assert cited and cited <= {d["id"] for d in documents}


@pytest.mark.kind
def test_a_network_policy_refuses_what_the_platform_does_not_use(target: Target) -> None:
    """The tokeniser has no business with Redis: its connection is dropped, while training's goes through."""
    if target.kubectl is None:
        pytest.skip("NetworkPolicies are enforced only on the kind cluster")
    connect = "import socket; socket.create_connection(('{host}', 6379), timeout=5); print('connected')"
    host = "llmp-redis"
    allowed = target.kubectl("exec", "deploy/llmp-training", "--", "python", "-c", connect.format(host=host))
    assert allowed.stdout.strip() == "connected", allowed.stderr
    denied = target.kubectl(
        "exec", "deploy/llmp-tokenizer", "--", "python", "-c", connect.format(host=host), check=False
    )
    assert denied.returncode != 0 and "connected" not in denied.stdout
    assert "timed out" in denied.stderr or "TimeoutError" in denied.stderr, denied.stderr[-500:]


@pytest.mark.kind
def test_the_ray_dashboard_is_not_reachable_from_the_gateway(target: Target) -> None:
    """The gateway may call the inference front, never the Ray head's dashboard or job API."""
    if target.kubectl is None:
        pytest.skip("NetworkPolicies are enforced only on the kind cluster")
    probe = "import socket; socket.create_connection(('llmp-inference-head-svc', 8265), timeout=5); print('connected')"
    result = target.kubectl("exec", "deploy/llmp-gateway", "--", "python", "-c", probe, check=False)
    assert result.returncode != 0 and "connected" not in result.stdout, result.stdout
