"""The RAG answer: retriever -> context -> generator as one call.

The retrieval service searches the collection and assembles a prompt within a token budget
with numbered sources (BuildContext); the inference service generates from that prompt, as
plain text or as one user message through the model's chat template. The answer comes back with
the citations the prompt numbered, so `[n]` in the text points at a source.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from llmp.inference.v1 import inference_pb2 as ipb
from llmp.retrieval.v1 import retrieval_pb2 as rpb

from libs.common import errors
from libs.common.clients.inference import generate_request
from libs.common.logs import request_id
from services.gateway import backends
from services.gateway.backends import Backends


@dataclass(frozen=True)
class Question:
    collection: str
    question: str
    model: str
    top_k: int = 5
    mode: str = "dense"
    context_tokens: int = 1024
    tokenizer: str = ""
    max_tokens: int = 256
    temperature: float = 0.0
    chat: bool = False


def citation_dicts(context: rpb.BuildContextResponse) -> list[dict[str, Any]]:
    return [
        {
            "number": c.number,
            "source": c.source,
            "document_id": c.document_id,
            "start": c.start,
            "end": c.end,
            "score": c.score,
        }
        for c in context.citations
    ]


async def build_context(b: Backends, q: Question) -> rpb.BuildContextResponse:
    search = rpb.SearchRequest(collection=q.collection, query=q.question, top_k=q.top_k, mode=q.mode)
    request = rpb.BuildContextRequest(search=search, max_tokens=q.context_tokens, tokenizer=q.tokenizer)
    return await backends.unary("retrieval", b.retrieval.BuildContext, request)


def generation(q: Question, context: rpb.BuildContextResponse) -> ipb.GenerateRequest:
    prompt: dict[str, Any] = (
        {"messages": [{"role": "user", "content": context.prompt}]} if q.chat else {"text": context.prompt}
    )
    return generate_request(
        q.model,
        max_tokens=q.max_tokens,
        temperature=q.temperature,
        request_id=f"{request_id.get()}-{uuid.uuid4().hex[:8]}",
        **prompt,
    )


MIN_CONTEXT_TOKENS = 16
"""The smallest context budget tried before a prompt that does not fit the model is refused."""


def _too_long(error: errors.InvalidArgument) -> bool:
    """The inference service's refusal of a prompt that, alone or with the answer's tokens, is longer
    than the model's context."""
    return (error.field == "prompt" and "do not fit" in str(error)) or (
        error.field == "max_tokens" and "exceed the context" in str(error)
    )


def _smaller(q: Question, error: errors.InvalidArgument) -> Question:
    """The question with a quarter less context budget; the refusal itself where none is left to take.
    (A quarter, not a half: a half can jump from a prompt just too long to one the question and
    template alone do not fit.)"""
    if not _too_long(error) or q.context_tokens <= MIN_CONTEXT_TOKENS:
        raise error
    return replace(q, context_tokens=max(MIN_CONTEXT_TOKENS, q.context_tokens * 3 // 4))


def _cited(context: rpb.BuildContextResponse, asked: Question, fitted: Question) -> rpb.BuildContextResponse:
    """The context, unless fitting it to the model left no retrieved chunk in it: an answer with
    nothing to cite is refused rather than given as if it were grounded."""
    if context.citations or fitted.context_tokens == asked.context_tokens:
        return context
    raise errors.InvalidArgument(
        f"no retrieved chunk fits the model's context beside the question and {asked.max_tokens} answer "
        "tokens: ask for fewer max_tokens, or use a model with a longer context",
        field="context_tokens",
    )


async def answer(b: Backends, q: Question) -> tuple[rpb.BuildContextResponse, ipb.GenerateResponse]:
    """Retrieve, build the cited context, generate. The context budget is counted by the retrieval
    service (its own tokenizer), not the model's: when the prompt does not fit the model's context,
    the budget shrinks by a quarter and the context is built again (down to MIN_CONTEXT_TOKENS)."""
    asked = q
    while True:
        context = _cited(await build_context(b, q), asked, q)
        try:
            reply = await backends.unary("inference", b.inference.Generate, generation(q, context))
        except errors.InvalidArgument as e:
            q = _smaller(q, e)
            continue
        return context, reply


async def answer_stream(
    b: Backends, q: Question
) -> tuple[rpb.BuildContextResponse, AsyncIterator[ipb.GenerateResponse]]:
    """The context now, and the generation's messages as they come (the first already awaited)."""
    asked = q
    while True:  # the context fitted to the model as in `answer` (the refusal comes before any token)
        context = _cited(await build_context(b, q), asked, q)
        messages = backends.stream("inference", b.inference.GenerateStream, generation(q, context))
        try:
            first = await anext(messages)
        except errors.InvalidArgument as e:
            q = _smaller(q, e)
            continue
        break

    async def rest() -> AsyncIterator[ipb.GenerateResponse]:
        yield first
        async for message in messages:
            yield message

    return context, rest()
