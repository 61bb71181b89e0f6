"""The demo's gateway client against the routes it relies on, served over a real socket.

The server here answers as the gateway's contract says (OpenAI chat completions whole and as
server-sent events; the platform's RAG answer route; a bearer key), so the client's side of that
contract is checked on its own: the key it sends, the bodies it posts, how it reads a stream.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse

from libs.common.demo import front_door
from libs.common.demo.runner import StageError
from libs.common.stack import free_port

pytestmark = pytest.mark.integration
KEY = "test-admin-key"


def gateway_app(seen: list[dict[str, Any]]) -> FastAPI:
    app = FastAPI()

    def check(authorization: str | None) -> None:
        if authorization != f"Bearer {KEY}":
            raise HTTPException(401, "bad key")

    @app.post("/v1/chat/completions")
    async def chat(request: Request, authorization: str | None = Header(None)) -> Any:
        check(authorization)
        body = await request.json()
        seen.append(body)
        words = ["Loops ", "repeat ", "a block."]
        if not body.get("stream"):
            message = {"role": "assistant", "content": "".join(words)}
            return {"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}  # fmt: skip

        def events() -> Iterator[str]:
            for word in words:
                chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}  # fmt: skip
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/api/v1/answer")
    async def rag(request: Request, authorization: str | None = Header(None)) -> Any:
        check(authorization)
        body = await request.json()
        seen.append(body)
        if body["collection"] == "missing":
            return JSONResponse({"error": {"message": "collection: no collection 'missing'"}}, status_code=404)
        citation = {"chunk_id": "seed.md#3", "source": "seed.md", "text": "RAG retrieves passages."}
        return {"answer": "It retrieves [1].", "citations": [citation]}

    return app


@pytest.fixture(scope="module")
def gateway() -> Iterator[tuple[int, list[dict[str, Any]]]]:
    seen: list[dict[str, Any]] = []
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(gateway_app(seen), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.01)
    yield port, seen
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def client(gateway: tuple[int, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    monkeypatch.setenv("LLMP_GATEWAY_HTTP_PORT", str(gateway[0]))
    monkeypatch.setenv("LLMP_HOME", str(tmp_path))
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "admin.key").write_text(KEY + "\n")
    monkeypatch.delenv("LLMP_API_KEY", raising=False)
    return front_door.Gateway({})


def test_chat_whole_and_streamed(client: Any, gateway: tuple[int, list[dict[str, Any]]]) -> None:
    messages = [{"role": "user", "content": "What does a loop do?"}]
    whole = client.chat("demo-chat", messages, 16, stream=False)
    streamed = client.chat("demo-chat", messages, 16, stream=True)
    assert whole.text == streamed.text == "Loops repeat a block."
    assert whole.completion_tokens == 3 and streamed.chunks == 3
    assert 0 < streamed.first_token_seconds <= streamed.seconds
    sent = gateway[1][-2:]
    assert [s.get("stream", False) for s in sent] == [False, True]
    assert all(s["messages"] == messages and s["max_tokens"] == 16 and s["temperature"] == 0 for s in sent)


def test_rag_answer_posts_the_contract_and_reads_citations(client: Any, gateway: tuple[int, list[Any]]) -> None:
    answer = client.rag_answer("docs", "What is RAG?", "demo-chat", 3, 24)
    assert answer.answer == "It retrieves [1]." and answer.citations[0]["chunk_id"] == "seed.md#3"
    assert gateway[1][-1] == {"collection": "docs", "question": "What is RAG?", "model": "demo-chat", "top_k": 3,
                              "max_tokens": 24, "mode": "hybrid", "tokenizer": ""}  # fmt: skip
    with pytest.raises(StageError, match="404"):
        client.rag_answer("missing", "What is RAG?", "demo-chat", 3, 24)


def test_a_wrong_key_and_an_absent_gateway_are_one_message(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMP_API_KEY", "wrong")
    with pytest.raises(StageError, match="401"):
        front_door.Gateway({}).chat("demo-chat", [{"role": "user", "content": "hi"}], 4, stream=False)
    monkeypatch.setenv("LLMP_GATEWAY_HTTP_PORT", str(free_port()))
    with pytest.raises(StageError, match="does not answer") as error:
        front_door.Gateway({}).chat("demo-chat", [{"role": "user", "content": "hi"}], 4, stream=False)
    assert "llmp up" in error.value.hint


def test_no_key_anywhere_says_where_it_looked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLMP_HOME", str(tmp_path))
    monkeypatch.delenv("LLMP_API_KEY", raising=False)
    with pytest.raises(StageError, match=r"admin\.key"):
        front_door.api_key()
