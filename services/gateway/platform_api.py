"""The platform API (REST under /api/v1): keys, tokenisers, corpora, training jobs, models,
collections, planning and the RAG answer. Each route is a thin adapter onto a backend RPC.

Remote callers never name server paths: a tokeniser is imported from uploaded bytes, corpora
are uploaded and then named, documents are sent inline, and models are loaded by registry
reference or by a folder relative to the artifact store (which refuses absolute paths and '..').
Long-running calls (watching a job, ingesting a corpus, a streamed answer) are server-sent events.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Query, Request
from google.protobuf import json_format, struct_pb2
from google.protobuf.descriptor import FieldDescriptor
from llmp.inference.v1 import inference_pb2 as ipb
from llmp.retrieval.v1 import retrieval_pb2 as rpb
from llmp.tokenizer.v1 import tokenizer_pb2 as tpb
from llmp.training.v1 import training_pb2 as jpb
from starlette.responses import JSONResponse, StreamingResponse

from libs.common.clients.tokenizer import chunks
from libs.common.errors import InvalidArgument, LlmpError, PermissionDenied
from services.gateway import backends, planning, rag
from services.gateway import platform_schema as s
from services.gateway.app import gateway, require
from services.gateway.http_errors import error_response
from services.gateway.keys import KeyRecord

router = APIRouter(prefix="/api/v1")


_INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


def _numbers(descriptor: Any, data: dict[str, Any]) -> dict[str, Any]:
    """Proto JSON writes 64-bit integers as strings; this API gives numbers (counts, sizes, bytes)."""
    for field in descriptor.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            inner = entry.fields_by_name["value"]
            if inner.type in _INT64:
                data[field.name] = {k: int(v) for k, v in value.items()}
        elif entry is not None and entry.full_name.startswith("llmp."):
            for item in value if isinstance(value, list) else [value]:
                _numbers(entry, item)
        elif field.type in _INT64:
            data[field.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
    return data


def as_dict(message: Any) -> dict[str, Any]:
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return _numbers(message.DESCRIPTOR, data)


def struct(value: dict[str, Any] | None) -> struct_pb2.Struct | None:
    if value is None:
        return None
    out = struct_pb2.Struct()
    out.update(value)
    return out


def key_dict(record: KeyRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "name": record.name,
        "scopes": list(record.scopes),
        "created_at": record.created_at,
        "expires_at": record.expires_at,
        "revoked": record.revoked,
        "requests_per_minute": record.requests_per_minute,
        "tokens_per_minute": record.tokens_per_minute,
    }


def events(messages: AsyncIterator[Any], shape: Any = as_dict) -> StreamingResponse:
    """Server-sent events, one per message; an error ends the stream with an error event."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for message in messages:
                yield f"data: {json.dumps(shape(message))}\n\n".encode()
        except LlmpError as e:
            yield b"event: error\ndata: " + bytes(error_response(e).body) + b"\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"cache-control": "no-cache"})


async def started(messages: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """Await the first message (so a refusal is a status code), then the whole stream."""
    first = await anext(messages, None)

    async def rest() -> AsyncIterator[Any]:
        if first is not None:
            yield first
        async for message in messages:
            yield message

    return rest()


# -- keys (admin) --------------------------------------------------------------------------------
@router.post("/keys", tags=["keys"], summary="make an API key (shown once)")
async def create_key(body: s.CreateKey, request: Request, key: KeyRecord = require("admin")) -> JSONResponse:
    new = await gateway(request).keys.create(
        body.name, body.scopes, body.ttl_seconds, body.requests_per_minute, body.tokens_per_minute
    )
    return JSONResponse({"key": new.key, "info": key_dict(new.record)}, status_code=201)


@router.get("/keys", tags=["keys"], summary="every key, without secrets")
async def list_keys(request: Request, key: KeyRecord = require("admin")) -> JSONResponse:
    return JSONResponse({"keys": [key_dict(r) for r in await gateway(request).keys.list()]})


@router.delete("/keys/{key_id}", tags=["keys"], summary="revoke a key")
async def revoke_key(key_id: str, request: Request, key: KeyRecord = require("admin")) -> JSONResponse:
    return JSONResponse(key_dict(await gateway(request).keys.revoke(key_id)))


@router.get("/whoami", tags=["keys"], summary="the caller's key")
async def whoami(request: Request, key: KeyRecord = require("")) -> JSONResponse:
    return JSONResponse(key_dict(key))


# -- tokenisers and corpora ------------------------------------------------------------------------
@router.get("/tokenizers", tags=["tokenizers"])
async def list_tokenizers(request: Request, prefix: str = "", key: KeyRecord = require("tokenizer")) -> JSONResponse:
    b = gateway(request).backends
    reply = await backends.unary("tokenizer", b.tokenizer.List, tpb.ListRequest(prefix=prefix))
    return JSONResponse({"tokenizers": [as_dict(t) for t in reply.tokenizers]})


@router.get("/tokenizers/{ref}", tags=["tokenizers"])
async def describe_tokenizer(ref: str, request: Request, key: KeyRecord = require("tokenizer")) -> JSONResponse:
    b = gateway(request).backends
    return JSONResponse(
        as_dict(await backends.unary("tokenizer", b.tokenizer.Describe, tpb.DescribeRequest(tokenizer=ref)))
    )


@router.post("/tokenizers", tags=["tokenizers"], summary="train a tokeniser in the background")
async def train_tokenizer(
    body: s.TrainTokenizer, request: Request, key: KeyRecord = require("tokenizer")
) -> JSONResponse:
    b = gateway(request).backends
    reply = await backends.unary("tokenizer", b.tokenizer.Train, tpb.TrainRequest(**body.model_dump()))
    return JSONResponse(as_dict(reply), status_code=202)


@router.get("/tokenizers/jobs/{job_id}/watch", tags=["tokenizers"], summary="a training job's progress (SSE)")
async def watch_tokenizer_job(
    job_id: str, request: Request, key: KeyRecord = require("tokenizer")
) -> StreamingResponse:
    b = gateway(request).backends
    call = backends.stream("tokenizer", b.tokenizer.WatchTraining, tpb.WatchTrainingRequest(job_id=job_id))
    return events(await started(call))


@router.put("/tokenizers/{name}", tags=["tokenizers"], summary="import a tokenizer.json or SentencePiece model (body)")
async def import_tokenizer(
    name: str,
    request: Request,
    format: str = Query("tokenizer.json", pattern="^(tokenizer.json|sentencepiece)$"),
    key: KeyRecord = require("tokenizer"),
) -> JSONResponse:
    data = await request.body()
    if not data:
        raise InvalidArgument("send the file's bytes as the body", field="body")
    b = gateway(request).backends
    info = await backends.unary("tokenizer", b.tokenizer.Import, tpb.ImportRequest(name=name, data=data, format=format))
    return JSONResponse(as_dict(info), status_code=201)


@router.post("/tokenizers/{ref}/encode", tags=["tokenizers"])
async def encode(ref: str, body: s.Encode, request: Request, key: KeyRecord = require("tokenizer")) -> JSONResponse:
    b = gateway(request).backends
    request_pb = tpb.EncodeRequest(
        tokenizer=ref, text=body.text, add_special_tokens=body.add_special_tokens, return_tokens=True
    )
    return JSONResponse(as_dict(await backends.unary("tokenizer", b.tokenizer.Encode, request_pb)))


@router.post("/tokenizers/{ref}/decode", tags=["tokenizers"])
async def decode(ref: str, body: s.Decode, request: Request, key: KeyRecord = require("tokenizer")) -> JSONResponse:
    b = gateway(request).backends
    request_pb = tpb.DecodeRequest(tokenizer=ref, ids=body.ids, skip_special_tokens=body.skip_special_tokens)
    return JSONResponse(as_dict(await backends.unary("tokenizer", b.tokenizer.Decode, request_pb)))


@router.post("/corpora", tags=["tokenizers"], summary="upload a corpus into the store, by name")
async def upload_corpus(body: s.UploadCorpus, request: Request, key: KeyRecord = require("tokenizer")) -> JSONResponse:
    b = gateway(request).backends
    with backends.translated("tokenizer"):
        reply = await b.tokenizer.UploadCorpus(chunks(body.name, body.documents), **backends.call_options())
    return JSONResponse(as_dict(reply), status_code=201)


# -- training jobs and the model registry ----------------------------------------------------------
@router.post("/jobs", tags=["training"], summary="submit a training job")
async def submit_job(body: s.SubmitJob, request: Request, key: KeyRecord = require("training")) -> JSONResponse:
    b = gateway(request).backends
    request_pb = jpb.SubmitJobRequest(type=body.type, config=struct(body.config), client_token=body.client_token)
    return JSONResponse(as_dict(await backends.unary("training", b.training.SubmitJob, request_pb)), status_code=202)


@router.get("/jobs", tags=["training"])
async def list_jobs(
    request: Request,
    state: str = Query("", pattern="^(|PENDING|RUNNING|SUCCEEDED|FAILED|CANCELLED)$"),
    type: str = "",
    limit: int = Query(100, ge=1, le=10000),
    key: KeyRecord = require("training"),
) -> JSONResponse:
    b = gateway(request).backends
    request_pb = jpb.ListJobsRequest(state=jpb.Job.State.Value(state) if state else 0, type=type, limit=limit)
    reply = await backends.unary("training", b.training.ListJobs, request_pb)
    return JSONResponse({"jobs": [as_dict(j) for j in reply.jobs]})


@router.get("/jobs/{job_id}", tags=["training"])
async def get_job(job_id: str, request: Request, key: KeyRecord = require("training")) -> JSONResponse:
    b = gateway(request).backends
    return JSONResponse(as_dict(await backends.unary("training", b.training.GetJob, jpb.GetJobRequest(job_id=job_id))))


@router.get("/jobs/{job_id}/watch", tags=["training"], summary="a job's events until it ends (SSE)")
async def watch_job(job_id: str, request: Request, key: KeyRecord = require("training")) -> StreamingResponse:
    b = gateway(request).backends
    return events(await started(backends.stream("training", b.training.WatchJob, jpb.WatchJobRequest(job_id=job_id))))


@router.post("/jobs/{job_id}/cancel", tags=["training"])
async def cancel_job(job_id: str, request: Request, key: KeyRecord = require("training")) -> JSONResponse:
    b = gateway(request).backends
    return JSONResponse(
        as_dict(await backends.unary("training", b.training.CancelJob, jpb.CancelJobRequest(job_id=job_id)))
    )


@router.post("/jobs/{job_id}/resume", tags=["training"])
async def resume_job(job_id: str, request: Request, key: KeyRecord = require("training")) -> JSONResponse:
    b = gateway(request).backends
    return JSONResponse(
        as_dict(await backends.unary("training", b.training.ResumeJob, jpb.ResumeJobRequest(job_id=job_id)))
    )


@router.get("/models", tags=["models"], summary="the registry: every version with its lineage")
async def registry(request: Request, prefix: str = "", key: KeyRecord = require("training")) -> JSONResponse:
    b = gateway(request).backends
    reply = await backends.unary("training", b.training.ListModels, jpb.ListModelsRequest(prefix=prefix))
    return JSONResponse({"models": [as_dict(m) for m in reply.models]})


@router.get("/models/{ref}", tags=["models"])
async def registry_model(ref: str, request: Request, key: KeyRecord = require("training")) -> JSONResponse:
    b = gateway(request).backends
    return JSONResponse(as_dict(await backends.unary("training", b.training.GetModel, jpb.GetModelRequest(model=ref))))


# -- served models ------------------------------------------------------------------------------------
@router.get("/served", tags=["models"], summary="models being served, with their load")
async def served(request: Request, key: KeyRecord = require("inference")) -> JSONResponse:
    b = gateway(request).backends
    reply = await backends.unary("inference", b.inference.ListModels, ipb.ListModelsRequest())
    return JSONResponse({"models": [as_dict(m) for m in reply.models]})


@router.post("/served", tags=["models"], summary="serve a registry model or store folder (quantised, speculative)")
async def load_model(body: s.LoadModel, request: Request, key: KeyRecord = require("admin")) -> JSONResponse:
    b = gateway(request).backends
    if (body.model is None) == (body.path is None):
        raise InvalidArgument("give a registry model or a store path, not both", field="model")
    path = body.path or ""
    if body.model is not None:
        path = (await backends.unary("training", b.training.GetModel, jpb.GetModelRequest(model=body.model))).path
    replicas = ipb.ReplicaOptions(num_gpus=body.num_gpus)
    for name in ("min_replicas", "max_replicas", "num_cpus"):
        if getattr(body, name) is not None:
            setattr(replicas, name, getattr(body, name))
    engine = ipb.EngineOptions(
        quantization=body.quantization,
        speculative=body.speculative,
        dtype=body.dtype,
        kv_cache_bytes=body.kv_cache_bytes,
        max_model_len=body.max_model_len,
    )
    request_pb = ipb.LoadModelRequest(path=path, name=body.name, replicas=replicas, engine=engine)
    return JSONResponse(as_dict(await backends.unary("inference", b.inference.LoadModel, request_pb)), status_code=201)


@router.delete("/served/{model}", tags=["models"])
async def unload_model(model: str, request: Request, key: KeyRecord = require("admin")) -> JSONResponse:
    b = gateway(request).backends
    await backends.unary("inference", b.inference.UnloadModel, ipb.UnloadModelRequest(model=model))
    return JSONResponse({"unloaded": model})


@router.post("/served/{model}/adapters", tags=["models"], summary="serve a LoRA adapter on a model")
async def load_adapter(
    model: str, body: s.LoadAdapter, request: Request, key: KeyRecord = require("admin")
) -> JSONResponse:
    b = gateway(request).backends
    request_pb = ipb.LoadAdapterRequest(model=model, name=body.name, path=body.path)
    return JSONResponse(
        as_dict(await backends.unary("inference", b.inference.LoadAdapter, request_pb)), status_code=201
    )


@router.delete("/served/{model}/adapters/{name}", tags=["models"])
async def unload_adapter(model: str, name: str, request: Request, key: KeyRecord = require("admin")) -> JSONResponse:
    b = gateway(request).backends
    request_pb = ipb.UnloadAdapterRequest(model=model, name=name)
    return JSONResponse(as_dict(await backends.unary("inference", b.inference.UnloadAdapter, request_pb)))


# -- collections ------------------------------------------------------------------------------------------
@router.get("/collections", tags=["retrieval"])
async def list_collections(request: Request, key: KeyRecord = require("retrieval")) -> JSONResponse:
    b = gateway(request).backends
    reply = await backends.unary("retrieval", b.retrieval.ListCollections, rpb.ListCollectionsRequest())
    return JSONResponse({"collections": [as_dict(c) for c in reply.collections]})


@router.post("/collections", tags=["retrieval"])
async def create_collection(
    body: s.CreateCollection, request: Request, key: KeyRecord = require("retrieval")
) -> JSONResponse:
    b = gateway(request).backends
    request_pb = rpb.CreateCollectionRequest(
        name=body.name,
        embedder=struct(body.embedder),
        distance=body.distance,
        sparse=body.sparse,
        quantization=body.quantization,
        quantizer=body.quantizer,
        chunker=struct(body.chunker),
    )
    return JSONResponse(
        as_dict(await backends.unary("retrieval", b.retrieval.CreateCollection, request_pb)), status_code=201
    )


@router.get("/collections/{name}", tags=["retrieval"])
async def describe_collection(name: str, request: Request, key: KeyRecord = require("retrieval")) -> JSONResponse:
    b = gateway(request).backends
    request_pb = rpb.DescribeCollectionRequest(name=name)
    return JSONResponse(as_dict(await backends.unary("retrieval", b.retrieval.DescribeCollection, request_pb)))


@router.delete("/collections/{name}", tags=["retrieval"])
async def delete_collection(name: str, request: Request, key: KeyRecord = require("retrieval")) -> JSONResponse:
    b = gateway(request).backends
    request_pb = rpb.DeleteCollectionRequest(name=name)
    return JSONResponse(as_dict(await backends.unary("retrieval", b.retrieval.DeleteCollection, request_pb)))


@router.post("/collections/{name}/documents", tags=["retrieval"], summary="ingest documents (inline text)")
async def ingest(name: str, body: s.Ingest, request: Request, key: KeyRecord = require("retrieval")) -> JSONResponse:
    b = gateway(request).backends
    documents = [
        rpb.Document(id=d.id, text=d.text, kind=d.kind, source=d.source, metadata=struct(d.metadata))
        for d in body.documents
    ]
    request_pb = rpb.IngestRequest(collection=name, documents=documents, chunker=struct(body.chunker))
    return JSONResponse(as_dict(await backends.unary("retrieval", b.retrieval.Ingest, request_pb)))


@router.post("/collections/{name}/corpus", tags=["retrieval"], summary="ingest an uploaded corpus, with progress (SSE)")
async def ingest_corpus(
    name: str, body: s.IngestCorpus, request: Request, key: KeyRecord = require("retrieval")
) -> StreamingResponse:
    b = gateway(request).backends
    request_pb = rpb.IngestCorpusRequest(
        collection=name, path=f"corpora/{body.corpus}", patterns=body.patterns, chunker=struct(body.chunker)
    )
    return events(await started(backends.stream("retrieval", b.retrieval.IngestCorpus, request_pb)))


@router.post("/collections/{name}/search", tags=["retrieval"])
async def search(name: str, body: s.Search, request: Request, key: KeyRecord = require("retrieval")) -> JSONResponse:
    b = gateway(request).backends
    request_pb = rpb.SearchRequest(
        collection=name, query=body.query, top_k=body.top_k, mode=body.mode, filter=struct(body.filter)
    )
    reply = await backends.unary("retrieval", b.retrieval.Search, request_pb)
    return JSONResponse({"hits": [as_dict(h) for h in reply.hits]})


# -- planning ----------------------------------------------------------------------------------------------
@router.post("/plan/memory", tags=["planning"], summary="memory of a model: weights, KV cache, training")
async def plan_memory(body: s.PlanMemory, key: KeyRecord = require("")) -> JSONResponse:
    return JSONResponse(planning.plan_memory(body.preset, body.config, body.tokens, body.batch))


@router.post("/plan/compute", tags=["planning"], summary="compute-optimal parameters and tokens for a budget")
async def plan_compute(body: s.PlanCompute, key: KeyRecord = require("")) -> JSONResponse:
    return JSONResponse(planning.plan_compute(body.flops, body.tokens_per_param))


# -- the RAG answer ----------------------------------------------------------------------------------------
@router.post("/answer", tags=["rag"], summary="retrieve, build the cited context, generate: the answer with citations")
async def answer(body: s.Answer, request: Request, key: KeyRecord = require("retrieval")) -> Any:
    if not key.allows("inference"):
        raise PermissionDenied(f"API key {key.id} lacks the 'inference' scope the answer needs")
    gw = gateway(request)
    q = rag.Question(**body.model_dump(exclude={"stream"}))
    if not body.stream:
        context, reply = await rag.answer(gw.backends, q)
        c = reply.completions[0]
        await gw.quotas.charge(key, reply.usage.prompt_tokens + reply.usage.completion_tokens)
        return JSONResponse(
            {
                "answer": c.text,
                "citations": rag.citation_dicts(context),
                "finish_reason": c.finish_reason,
                "usage": {
                    "prompt_tokens": reply.usage.prompt_tokens,
                    "completion_tokens": reply.usage.completion_tokens,
                },
                "context_tokens": context.tokens,
                "dropped": context.dropped,
            }
        )
    context, messages = await rag.answer_stream(gw.backends, q)
    head = {"citations": rag.citation_dicts(context), "context_tokens": context.tokens, "dropped": context.dropped}

    async def stream() -> AsyncIterator[dict[str, Any]]:
        yield head
        tokens = 0
        try:
            async for m in messages:
                c = m.completions[0] if m.completions else None
                tokens = m.usage.prompt_tokens + m.usage.completion_tokens if m.HasField("usage") else tokens
                yield {"text": c.text if c else "", "finish_reason": c.finish_reason if c else ""}
        finally:
            await gw.quotas.charge(key, tokens)

    return events(stream(), shape=lambda d: d)
