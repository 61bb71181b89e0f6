"""Every call the main job makes through the platform's front door, the gateway, in one place.

- chat completions (whole and streamed) through the OpenAI-compatible API (`/v1`), with the
  official `openai` client;
- RAG answers through the platform API: `POST /api/v1/answer` with
  {"collection", "question", "model", "top_k", "max_tokens"} -> {"answer", "citations": [{"chunk_id",
  "source", "text", ...}]}, with httpx.

The API key is LLMP_API_KEY, else the admin key the stack generated ($LLMP_HOME/secrets/admin.key);
the gateway listens on 127.0.0.1:LLMP_GATEWAY_HTTP_PORT (default 8000). There is no other way
in: a gateway that is not running stops the stage (the runner checks its health before the stage
starts, and a gateway that stops answering later is one StageError naming what to do).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from libs.common import config as cfg
from libs.common.config import CommonConfig
from libs.common.demo.runner import StageError
from libs.common.settings import env

RAG_ANSWER = "/api/v1/answer"


@dataclass
class Reply:
    text: str
    completion_tokens: int
    seconds: float
    first_token_seconds: float = 0.0
    chunks: int = 1


@dataclass
class Answer:
    answer: str
    citations: list[dict[str, Any]]
    seconds: float


def api_key() -> str:
    key = env("LLMP_API_KEY")
    if key:
        return key
    path = cfg.load(CommonConfig, "common").home_path / "secrets" / "admin.key"
    if not path.is_file():
        raise StageError(
            f"no API key: LLMP_API_KEY is unset and {path} does not exist",
            "start the stack with `llmp up` (it generates the admin key) or set LLMP_API_KEY",
        )
    return Path(path).read_text().strip()


def gateway_url() -> str:
    return f"http://127.0.0.1:{os.environ.get('LLMP_GATEWAY_HTTP_PORT', '8000')}"


class Gateway:
    def __init__(self, tokenizers: dict[str, str]) -> None:
        import httpx
        import openai

        self.tokenizers = tokenizers
        """Served model name -> its tokeniser's reference (the RAG context is counted in its tokens)."""
        self.base = gateway_url()
        key = api_key()
        self.openai = openai.OpenAI(base_url=f"{self.base}/v1", api_key=key, timeout=600, max_retries=0)
        self.http = httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {key}"}, timeout=600)

    @contextlib.contextmanager
    def _calling(self, what: str) -> Iterator[None]:
        """The gateway's refusals and absence as one StageError naming the route."""
        import httpx
        import openai

        try:
            yield
        except (openai.APIConnectionError, httpx.TransportError) as e:
            raise StageError(
                f"the gateway does not answer at {self.base} ({type(e).__name__})",
                "start it with `llmp up` (see `llmp status` and $LLMP_HOME/logs/gateway.log), then rerun `llmp demo`",
            ) from None
        except openai.APIStatusError as e:
            raise StageError(f"the gateway answered {e.status_code} to {what}: {e.message}") from None

    def chat(self, model: str, messages: list[dict[str, str]], max_tokens: int, stream: bool) -> Reply:
        started = time.perf_counter()
        sent = cast(Any, messages)
        with self._calling("/v1/chat/completions"):
            if not stream:
                out = self.openai.chat.completions.create(
                    model=model, messages=sent, max_tokens=max_tokens, temperature=0
                )
                tokens = out.usage.completion_tokens if out.usage else 0
                return Reply(out.choices[0].message.content or "", tokens, time.perf_counter() - started)
            first, parts = 0.0, []
            events = self.openai.chat.completions.create(
                model=model, messages=sent, max_tokens=max_tokens, temperature=0, stream=True
            )
            for event in events:
                delta = event.choices[0].delta.content if event.choices else None
                if delta:
                    first = first or time.perf_counter() - started
                    parts.append(delta)
        return Reply("".join(parts), len(parts), time.perf_counter() - started, first, len(parts))

    def rag_answer(self, collection: str, question: str, model: str, top_k: int, max_tokens: int) -> Answer:
        started = time.perf_counter()
        body = {
            "collection": collection,
            "question": question,
            "model": model,
            "top_k": top_k,
            "max_tokens": max_tokens,
            "mode": "hybrid",
            "tokenizer": self.tokenizers.get(model, ""),
        }
        with self._calling(RAG_ANSWER):
            reply = self.http.post(RAG_ANSWER, json=body)
        if reply.status_code != 200:
            raise StageError(f"the gateway answered {reply.status_code} to {RAG_ANSWER}: {reply.text[:300]}")
        data = reply.json()
        return Answer(data["answer"], list(data["citations"]), time.perf_counter() - started)
