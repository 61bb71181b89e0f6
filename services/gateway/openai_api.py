"""OpenAI-compatible HTTP: /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings, and
vLLM's /tokenize and /detokenize.

Each route checks its body (openai_schema), builds inference GenerateRequests, calls the
backend with the request's deadline and id, and shapes the answer as OpenAI does: `usage` with
prompt, completion and total tokens; `finish_reason` "stop" or "length"; streams as server-sent
events of chunks, the usage chunk last when stream_options.include_usage asks, then `[DONE]`.
A stream's first backend message is awaited before the response starts, so an unknown model or
a refused value is an ordinary error status, not a broken stream.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from google.protobuf import struct_pb2
from llmp.inference.v1 import inference_pb2 as ipb
from llmp.retrieval.v1 import retrieval_pb2 as rpb
from starlette.responses import JSONResponse, StreamingResponse

from libs.common.clients.inference import generate_request
from libs.common.errors import InvalidArgument, LlmpError
from libs.common.logs import request_id
from services.gateway import backends, metrics
from services.gateway.app import Gateway, gateway, now, require
from services.gateway.http_errors import error_response
from services.gateway.keys import KeyRecord
from services.gateway.model_text import ModelText
from services.gateway.openai_schema import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    Sampling,
    TokenizeRequest,
)

router = APIRouter(tags=["openai"])
FINISH = {"stop": "stop", "length": "length"}


def sampling(body: Sampling, max_tokens: int | None, logprobs: int | None) -> dict[str, Any]:
    return {
        "max_tokens": max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": max(0, body.top_k or 0),
        "min_p": body.min_p,
        "repetition_penalty": body.repetition_penalty,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "logit_bias": body.bias(),
        "seed": body.seed,
        "n": body.n,
        "stop": body.stop_list(),
        "stop_token_ids": body.stop_token_ids,
        "ignore_eos": body.ignore_eos,
        "logprobs": logprobs,
        "request_id": f"{request_id.get()}-{uuid.uuid4().hex[:8]}",
    }


def usage(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if cached:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


async def _text(gw: Gateway, model: str, wanted: bool) -> ModelText | None:
    """The model's tokenizer when logprobs need token strings."""
    return await gw.texts.get(model) if wanted else None


def _token(text: ModelText | None, token_id: int) -> str:
    return text.token(token_id) if text is not None else f"token_id:{token_id}"


# -- /v1/models ------------------------------------------------------------------------------------
def model_card(info: ipb.ModelInfo) -> dict[str, Any]:
    return {
        "id": info.name,
        "object": "model",
        "created": 0,
        "owned_by": "llmp",
        "root": info.path,
        "max_model_len": info.context_length,
    }


@router.get("/v1/models", summary="served models")
async def list_models(request: Request, key: KeyRecord = require("inference")) -> JSONResponse:
    gw = gateway(request)
    reply = await backends.unary("inference", gw.backends.inference.ListModels, ipb.ListModelsRequest())
    return JSONResponse({"object": "list", "data": [model_card(m) for m in reply.models]})


@router.get("/v1/models/{model}", summary="one served model")
async def get_model(model: str, request: Request, key: KeyRecord = require("inference")) -> JSONResponse:
    gw = gateway(request)
    info = await backends.unary("inference", gw.backends.inference.GetModelInfo, ipb.GetModelInfoRequest(model=model))
    return JSONResponse(model_card(info))


# -- streaming helpers -------------------------------------------------------------------------------
def sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def first_then_rest(messages: AsyncIterator[Any]) -> tuple[Any, AsyncIterator[Any]]:
    """Await the first message (errors surface as statuses), then hand back the whole stream."""
    first = await anext(messages)

    async def rest() -> AsyncIterator[Any]:
        yield first
        async for message in messages:
            yield message

    return first, rest()


async def events(
    gw: Gateway, key: KeyRecord, messages: AsyncIterator[ipb.GenerateResponse], shape: Any, include_usage: bool
) -> AsyncIterator[bytes]:
    """SSE bytes of a stream: `shape(message)` per backend message, then usage and [DONE]; tokens charged."""
    final: ipb.GenerateResponse | None = None
    completion = 0
    try:
        async for message in messages:
            completion += sum(len(c.token_ids) for c in message.completions)
            if message.HasField("usage"):
                final = message
            for chunk in shape(message):
                yield sse(chunk)
        if include_usage and final is not None:
            u = final.usage
            yield sse(shape.usage_chunk(usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens)))
    except LlmpError as e:
        body = json.loads(bytes(error_response(e).body))
        yield sse(body)
    finally:
        prompt = final.usage.prompt_tokens if final is not None else 0
        await _charge(gw, key, prompt + completion)
    yield b"data: [DONE]\n\n"


async def _charge(gw: Gateway, key: KeyRecord, tokens: int) -> None:
    metrics.TOKENS.labels("total").inc(tokens)
    await asyncio.shield(gw.quotas.charge(key, tokens))


def streaming(body: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers={"cache-control": "no-cache"})


# -- /v1/completions ----------------------------------------------------------------------------------
def completion_logprobs(c: ipb.Completion, text: ModelText | None) -> dict[str, Any] | None:
    if not c.logprobs:
        return None
    tokens = [_token(text, lp.token_id) for lp in c.logprobs]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in c.logprobs],
        "top_logprobs": [{_token(text, t): v for t, v in lp.top.items()} for lp in c.logprobs],
        "text_offset": offsets,
    }


class CompletionShape:
    def __init__(self, cid: str, model: str, text: ModelText | None) -> None:
        self.cid, self.model, self.text, self.created = cid, model, text, now()

    def __call__(self, message: ipb.GenerateResponse) -> list[dict[str, Any]]:
        choices = [
            {
                "index": c.index,
                "text": c.text,
                "logprobs": completion_logprobs(c, self.text),
                "finish_reason": FINISH.get(c.finish_reason, "stop") if c.finish_reason else None,
            }
            for c in message.completions
            if c.text or c.finish_reason or c.token_ids
        ]
        return [self.chunk(choices)] if choices else []

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.cid,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def usage_chunk(self, u: dict[str, Any]) -> dict[str, Any]:
        return self.chunk([], usage=u)


@router.post("/v1/completions", summary="text completions (OpenAI)")
async def completions(body: CompletionRequest, request: Request, key: KeyRecord = require("inference")) -> Any:
    gw = gateway(request)
    prompts = body.prompts()
    if body.stream and len(prompts) > 1:
        raise InvalidArgument("a stream takes one prompt", field="prompt")
    text = await _text(gw, body.model, body.logprobs is not None)
    shape = CompletionShape(f"cmpl-{request_id.get()}", body.model, text)
    requests = [
        generate_request(
            body.model,
            text=p if isinstance(p, str) else None,
            token_ids=p if isinstance(p, list) else None,
            **sampling(body, body.max_tokens, body.logprobs),
        )
        for p in prompts
    ]
    if body.stream:
        include = bool(body.stream_options and body.stream_options.include_usage)
        _, messages = await first_then_rest(
            backends.stream("inference", gw.backends.inference.GenerateStream, requests[0])
        )
        return streaming(events(gw, key, messages, shape, include))
    replies = await asyncio.gather(*(backends.unary("inference", gw.backends.inference.Generate, r) for r in requests))
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for p, reply in enumerate(replies):
        prompt_tokens += reply.usage.prompt_tokens
        completion_tokens += reply.usage.completion_tokens
        for c in reply.completions:
            choices.append(
                {
                    "index": p * body.n + c.index,
                    "text": c.text,
                    "logprobs": completion_logprobs(c, text),
                    "finish_reason": FINISH.get(c.finish_reason, "stop"),
                }
            )
    await _charge(gw, key, prompt_tokens + completion_tokens)
    return JSONResponse(shape.chunk(choices, usage=usage(prompt_tokens, completion_tokens)))


# -- /v1/chat/completions ---------------------------------------------------------------------------
def chat_logprobs(c: ipb.Completion, text: ModelText | None, top: int) -> dict[str, Any] | None:
    if not c.logprobs:
        return None

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        token = _token(text, token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    content = []
    for lp in c.logprobs:
        alternatives = sorted(lp.top.items(), key=lambda kv: -kv[1])[:top]
        content.append({**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in alternatives]})
    return {"content": content}


class ChatShape:
    def __init__(self, cid: str, model: str, text: ModelText | None, top: int) -> None:
        self.cid, self.model, self.text, self.top, self.created = cid, model, text, top, now()
        self.opened: set[int] = set()

    def __call__(self, message: ipb.GenerateResponse) -> list[dict[str, Any]]:
        choices = []
        for c in message.completions:
            delta: dict[str, Any] = {}
            if c.index not in self.opened:
                self.opened.add(c.index)
                delta["role"] = "assistant"
            if c.text or "role" in delta:
                delta["content"] = c.text
            if not delta and not c.finish_reason:
                continue
            choices.append(
                {
                    "index": c.index,
                    "delta": delta,
                    "logprobs": chat_logprobs(c, self.text, self.top),
                    "finish_reason": FINISH.get(c.finish_reason, "stop") if c.finish_reason else None,
                }
            )
        return [self.chunk(choices)] if choices else []

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.cid,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def usage_chunk(self, u: dict[str, Any]) -> dict[str, Any]:
        return self.chunk([], usage=u)


@router.post("/v1/chat/completions", summary="chat completions with the model's chat template (OpenAI)")
async def chat_completions(body: ChatRequest, request: Request, key: KeyRecord = require("inference")) -> Any:
    gw = gateway(request)
    text = await _text(gw, body.model, body.logprobs)
    top = body.top_logprobs or 0
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    generate = generate_request(
        body.model, messages=messages, **sampling(body, body.token_limit(), top if body.logprobs else None)
    )
    structured = body.structured()
    if structured is not None:  # response_format: the inference service's grammar-constrained sampling
        generate.processors.add().update(structured)
    cid = f"chatcmpl-{request_id.get()}"
    if body.stream:
        include = bool(body.stream_options and body.stream_options.include_usage)
        shape = ChatShape(cid, body.model, text, top)
        _, stream = await first_then_rest(backends.stream("inference", gw.backends.inference.GenerateStream, generate))
        return streaming(events(gw, key, stream, shape, include))
    reply = await backends.unary("inference", gw.backends.inference.Generate, generate)
    u = reply.usage
    await _charge(gw, key, u.prompt_tokens + u.completion_tokens)
    choices = [
        {
            "index": c.index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": chat_logprobs(c, text, top),
            "finish_reason": FINISH.get(c.finish_reason, "stop"),
        }
        for c in reply.completions
    ]
    return JSONResponse(
        {
            "id": cid,
            "object": "chat.completion",
            "created": now(),
            "model": body.model,
            "choices": choices,
            "usage": usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens),
        }
    )


# -- /v1/embeddings -------------------------------------------------------------------------------------
def embedder_spec(model: str) -> struct_pb2.Struct:
    spec = struct_pb2.Struct()
    spec.update({"type": model})
    return spec


@router.post("/v1/embeddings", summary="embeddings with a retrieval embedder (model = its name)")
async def embeddings(body: EmbeddingRequest, request: Request, key: KeyRecord = require("inference")) -> JSONResponse:
    gw = gateway(request)
    texts = body.texts()
    reply = await backends.unary(
        "retrieval", gw.backends.retrieval.Embed, rpb.EmbedRequest(texts=texts, embedder=embedder_spec(body.model))
    )
    if body.dimensions is not None and body.dimensions != reply.dim:
        raise InvalidArgument(f"{body.model} makes vectors of {reply.dim} dimensions", field="dimensions")
    data = []
    for i, vector in enumerate(reply.vectors):
        values = list(vector.values)
        encoded: Any = values
        if body.encoding_format == "base64":
            encoded = base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
        data.append({"object": "embedding", "index": i, "embedding": encoded})
    await _charge(gw, key, reply.tokens)
    tokens = int(reply.tokens)
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "model": body.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


# -- vLLM's /tokenize and /detokenize -------------------------------------------------------------------
@router.post("/tokenize", summary="token ids of a prompt or of chat messages (vLLM)")
async def tokenize(body: TokenizeRequest, request: Request, key: KeyRecord = require("inference")) -> JSONResponse:
    text = await gateway(request).texts.get(body.model)
    if body.messages is not None:
        rendered = text.render(
            [{"role": m.role, "content": m.text()} for m in body.messages], body.add_generation_prompt
        )
        ids = text.tokenizer.encode(rendered, add_special_tokens=False).ids
    else:
        ids = text.tokenizer.encode(body.prompt or "", add_special_tokens=body.add_special_tokens).ids
    return JSONResponse({"count": len(ids), "max_model_len": text.context_length, "tokens": ids})


@router.post("/detokenize", summary="the text of token ids (vLLM)")
async def detokenize(body: DetokenizeRequest, request: Request, key: KeyRecord = require("inference")) -> JSONResponse:
    text = await gateway(request).texts.get(body.model)
    size = text.tokenizer.get_vocab_size()
    bad = [t for t in body.tokens if t >= size]
    if bad:
        raise InvalidArgument(f"token ids must be < {size}; got {bad[:5]}", field="tokens")
    return JSONResponse({"prompt": text.tokenizer.decode(body.tokens, skip_special_tokens=False)})
