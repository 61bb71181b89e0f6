"""Every call the main job makes through the platform's front door, the gateway, in one place.

- chat completions (whole and streamed) through the OpenAI-compatible API (`/v1`), with the
  official `openai` client;
- RAG answers through the platform API: `POST /api/v1/answer` with
  {"collection", "question", "model", "top_k", "max_tokens"} -> {"answer", "citations": [{"chunk_id",
  "source", "text", ...}]}, with httpx.

The API key is LLMP_API_KEY, else the admin key the stack generated ($LLMP_HOME/secrets/admin.key);
the gateway listens on 127.0.0.1:LLMP_GATEWAY_HTTP_PORT (default 8000).

DirectFallback stands in for the gateway ONLY where the gateway is not installed: it calls the
inference, tokeniser and retrieval services directly (the chat template from the tokeniser
service, the RAG prompt from retrieval's BuildContext). The run prints it loudly and the report
records it. Remove it once the gateway ships with the platform.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

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
    retrieved: list[dict[str, Any]] = field(default_factory=list)
    """The fallback's own search hits (the gateway returns only what it cited)."""


class FrontDoor(Protocol):
    kind: str
    """"gateway" or "direct services (fallback: no gateway installed)"."""

    def chat(self, model: str, messages: list[dict[str, str]], max_tokens: int, stream: bool) -> Reply: ...

    def rag_answer(self, collection: str, question: str, model: str, top_k: int, max_tokens: int) -> Answer: ...


def gateway_installed() -> bool:
    return any(ep.name == "gateway" for ep in importlib.metadata.entry_points(group="llmp.services"))


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
    kind = "gateway"

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


class DirectFallback:
    """No gateway installed: the same calls straight to the services (see the module docstring)."""

    kind = "direct services (FALLBACK: no gateway installed)"

    def __init__(self, tokenizers: dict[str, str]) -> None:
        from libs.common.clients.retrieval import RetrievalClient
        from libs.common.clients.tokenizer import TokenizerClient
        from libs.common.demo.serving import Inference

        self.tokenizers = tokenizers
        """Served model name -> its tokeniser's reference."""
        self.inference, self.tokenizer, self.retrieval = Inference(), TokenizerClient(), RetrievalClient()

    def _chat_ids(self, model: str, messages: list[dict[str, str]]) -> list[int]:
        from llmp.tokenizer.v1 import tokenizer_pb2 as tpb

        request = tpb.ApplyChatTemplateRequest(
            tokenizer=self.tokenizers[model],
            messages=[tpb.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
            add_generation_prompt=True,
        )
        return list(self.tokenizer.stub.ApplyChatTemplate(request).ids)

    def chat(self, model: str, messages: list[dict[str, str]], max_tokens: int, stream: bool) -> Reply:
        from llmp.inference.v1 import inference_pb2 as ipb

        ids = self._chat_ids(model, messages)
        request = ipb.GenerateRequest(
            model=model, token_ids=ipb.TokenIds(ids=ids), max_tokens=max_tokens, temperature=0.0
        )
        started = time.perf_counter()
        if not stream:
            reply = self.inference.stub.Generate(request, timeout=600)
            c = reply.completions[0]
            return Reply(c.text, len(c.token_ids), time.perf_counter() - started)
        first, parts, tokens = 0.0, [], 0
        for message in self.inference.stub.GenerateStream(request, timeout=600):
            for c in message.completions:
                tokens += len(c.token_ids)
                if c.text:
                    first = first or time.perf_counter() - started
                    parts.append(c.text)
        return Reply("".join(parts), tokens, time.perf_counter() - started, first, len(parts))

    def rag_answer(self, collection: str, question: str, model: str, top_k: int, max_tokens: int) -> Answer:
        from llmp.inference.v1 import inference_pb2 as ipb
        from llmp.retrieval.v1 import retrieval_pb2 as rpb

        started = time.perf_counter()
        info = self.inference.info(model)
        search = rpb.SearchRequest(collection=collection, query=question, top_k=top_k, mode="hybrid")
        hits = self.retrieval.stub.Search(search).hits
        context = self.retrieval.context(
            search,
            max_tokens=max(info.context_length - max_tokens, 16),
            tokenizer=self.tokenizers[model],
            template="{context}\nQuestion: {question}\nAnswer:",
        )
        request = ipb.GenerateRequest(model=model, text=context.prompt, max_tokens=max_tokens, temperature=0.0)
        text = self.inference.stub.Generate(request, timeout=600).completions[0].text
        by_span = {(h.document_id, h.start, h.end): h for h in hits}
        citations = []
        for c in context.citations:
            hit = by_span.get((c.document_id, c.start, c.end))
            citations.append(
                {
                    "number": c.number,
                    "source": c.source,
                    "document_id": c.document_id,
                    "start": c.start,
                    "end": c.end,
                    "chunk_id": f"{c.document_id}#{hit.chunk_index}" if hit else "",
                    "text": hit.text if hit else "",
                }
            )
        retrieved = [
            {"chunk_id": f"{h.document_id}#{h.chunk_index}", "source": h.source, "start": h.start, "end": h.end}
            for h in hits
        ]
        return Answer(text, citations, time.perf_counter() - started, retrieved)


def open_front_door(tokenizers: dict[str, str]) -> FrontDoor:
    """The gateway where it is installed (a stopped one is an error), else the direct fallback."""
    if gateway_installed():
        return Gateway(tokenizers)
    return DirectFallback(tokenizers)
