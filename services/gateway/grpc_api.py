"""The gateway's gRPC side: GatewayService, and the backends' own services behind the same keys.

Every call needs `authorization: Bearer <key>` metadata. GatewayService's methods are served
here (keys, the RAG answer, the planners). The four backend services are proxied message by
message with their own protos, so every existing client (the `llmp` command line included)
works through the gateway by pointing at it and sending a key: each service needs its scope
(loading and unloading models: admin), each call is admitted against the key's quota, and
requests that name server paths are refused before they are forwarded. The request id and the
caller's deadline travel on to the backend (the server kit set both).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import PurePosixPath
from typing import Any

import grpc
from google.protobuf import message_factory
from llmp.gateway.v1 import gateway_pb2 as pb
from llmp.gateway.v1 import gateway_pb2_grpc as pb_grpc
from llmp.inference.v1 import inference_pb2 as ipb
from llmp.retrieval.v1 import retrieval_pb2 as rpb
from llmp.tokenizer.v1 import tokenizer_pb2 as tpb
from llmp.training.v1 import training_pb2 as jpb

from libs.common.errors import InvalidArgument, PermissionDenied, ResourceExhausted
from libs.common.rpc.server import Registration
from services.gateway import backends, planning, rag
from services.gateway.app import Gateway
from services.gateway.keys import KeyRecord

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GatewayService"].full_name
ADMIN_METHODS = {"LoadModel", "UnloadModel", "LoadAdapter", "UnloadAdapter"}


def bearer(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and value.lower().startswith("bearer "):
            return str(value[7:].strip())
        if key == "x-api-key":
            return str(value).strip()
    return ""


async def authorize(gw: Gateway, context: grpc.aio.ServicerContext, scopes: tuple[str, ...]) -> KeyRecord:
    """The caller's key, holding every scope in `scopes`, admitted against its quota."""
    key = await gw.keys.verify(bearer(context))
    for scope in scopes:
        if not key.allows(scope):
            raise PermissionDenied(f"API key {key.id} lacks the {scope!r} scope (it has {','.join(key.scopes)})")
    try:
        await gw.quotas.admit(key)
    except ResourceExhausted as e:
        context.set_trailing_metadata((("retry-after", str(int(max(1, e.retry_after)))),))
        raise
    return key


def key_pb(record: KeyRecord) -> pb.ApiKey:
    out = pb.ApiKey(
        id=record.id,
        name=record.name,
        scopes=record.scopes,
        created_at=record.created_at,
        expires_at=record.expires_at,
        revoked=record.revoked,
    )
    if record.requests_per_minute is not None:
        out.requests_per_minute = record.requests_per_minute
    if record.tokens_per_minute is not None:
        out.tokens_per_minute = record.tokens_per_minute
    return out


def _optional(message: Any, name: str) -> int | None:
    return getattr(message, name) if message.HasField(name) else None


def question(r: pb.AnswerRequest) -> rag.Question:
    return rag.Question(
        collection=r.collection,
        question=r.question,
        model=r.model,
        top_k=r.top_k or 5,
        mode=r.mode or "dense",
        context_tokens=r.context_tokens or 1024,
        tokenizer=r.tokenizer,
        max_tokens=r.max_tokens if r.HasField("max_tokens") else 256,
        temperature=r.temperature if r.HasField("temperature") else 0.0,
        chat=r.chat,
    )


def citations_pb(context: rpb.BuildContextResponse) -> list[pb.Citation]:
    return [pb.Citation(**c) for c in rag.citation_dicts(context)]


class GatewayServicer(pb_grpc.GatewayServiceServicer):
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    async def CreateKey(self, request: pb.CreateKeyRequest, context: Any) -> pb.CreateKeyResponse:
        await authorize(self.gw, context, ("admin",))
        new = await self.gw.keys.create(
            request.name,
            list(request.scopes),
            request.ttl_seconds,
            _optional(request, "requests_per_minute"),
            _optional(request, "tokens_per_minute"),
        )
        return pb.CreateKeyResponse(key=new.key, info=key_pb(new.record))

    async def ListKeys(self, request: pb.ListKeysRequest, context: Any) -> pb.ListKeysResponse:
        await authorize(self.gw, context, ("admin",))
        return pb.ListKeysResponse(keys=[key_pb(r) for r in await self.gw.keys.list()])

    async def RevokeKey(self, request: pb.RevokeKeyRequest, context: Any) -> pb.ApiKey:
        await authorize(self.gw, context, ("admin",))
        return key_pb(await self.gw.keys.revoke(request.id))

    async def WhoAmI(self, request: pb.WhoAmIRequest, context: Any) -> pb.ApiKey:
        return key_pb(await authorize(self.gw, context, ()))

    async def Answer(self, request: pb.AnswerRequest, context: Any) -> pb.AnswerResponse:
        key = await authorize(self.gw, context, ("retrieval", "inference"))
        ctx, reply = await rag.answer(self.gw.backends, question(request))
        c, u = reply.completions[0], reply.usage
        await self.gw.quotas.charge(key, u.prompt_tokens + u.completion_tokens)
        return pb.AnswerResponse(
            text=c.text,
            citations=citations_pb(ctx),
            finish_reason=c.finish_reason,
            prompt_tokens=u.prompt_tokens,
            completion_tokens=u.completion_tokens,
            context_tokens=ctx.tokens,
            dropped=ctx.dropped,
        )

    async def AnswerStream(self, request: pb.AnswerRequest, context: Any) -> AsyncIterator[pb.AnswerResponse]:
        key = await authorize(self.gw, context, ("retrieval", "inference"))
        ctx, messages = await rag.answer_stream(self.gw.backends, question(request))
        yield pb.AnswerResponse(citations=citations_pb(ctx), context_tokens=ctx.tokens, dropped=ctx.dropped)
        tokens = 0
        try:
            async for m in messages:
                c = m.completions[0]
                out = pb.AnswerResponse(text=c.text, finish_reason=c.finish_reason)
                if m.HasField("usage"):
                    out.prompt_tokens, out.completion_tokens = m.usage.prompt_tokens, m.usage.completion_tokens
                    tokens = m.usage.prompt_tokens + m.usage.completion_tokens
                yield out
        finally:
            await self.gw.quotas.charge(key, tokens)

    async def PlanMemory(self, request: pb.PlanMemoryRequest, context: Any) -> pb.PlanMemoryResponse:
        await authorize(self.gw, context, ())
        try:
            config = json.loads(request.config_json) if request.config_json else None
        except json.JSONDecodeError as e:
            raise InvalidArgument(f"not JSON: {e}", field="config_json") from None
        plan = planning.plan_memory(request.preset or "llama-3-8b", config, request.tokens or 4096, request.batch or 1)
        return pb.PlanMemoryResponse(
            parameters=plan["parameters"],
            weights=[pb.WeightRow(**w) for w in plan["weights"]],
            kv_bytes_per_token=plan["kv_bytes_per_token"],
            kv_bytes=plan["kv_bytes"],
            training_bytes=plan["training_bytes"],
        )

    async def PlanCompute(self, request: pb.PlanComputeRequest, context: Any) -> pb.PlanComputeResponse:
        await authorize(self.gw, context, ())
        plan = planning.plan_compute(request.flops, request.tokens_per_param or 20.0)
        return pb.PlanComputeResponse(rows=[pb.ComputeRow(**r) for r in plan["rows"]])


# -- the backends' services, proxied -----------------------------------------------------------------
def _store_path(value: str, field: str) -> None:
    """A path must name something in the artifact store: relative, without '..'."""
    if value and (PurePosixPath(value).is_absolute() or ".." in PurePosixPath(value).parts or value.startswith("~")):
        raise InvalidArgument("remote callers name artifacts relative to the store, without '..'", field=field)


def check_paths(method: str, request: Any) -> None:
    """Refuse requests that would make a backend read a server path the caller chose."""
    if isinstance(request, tpb.ImportRequest) and request.path:
        raise InvalidArgument("remote callers send the tokeniser's bytes in `data`", field="path")
    if isinstance(request, tpb.TrainRequest | tpb.VocabReportRequest):
        for i, corpus in enumerate(request.corpus):
            _store_path(corpus, f"corpus[{i}]")
    if isinstance(request, rpb.IngestRequest):
        for i, document in enumerate(request.documents):
            _store_path(document.path, f"documents[{i}].path")
    if isinstance(request, rpb.IngestCorpusRequest | ipb.LoadModelRequest | ipb.LoadAdapterRequest):
        _store_path(request.path, "path")


class Proxy:
    """Handlers that forward one backend service's methods to it, behind keys, quotas and checks."""

    SCOPES = {"tokenizer": "tokenizer", "retrieval": "retrieval", "training": "training", "inference": "inference"}

    def __init__(self, gw: Gateway, service: str, descriptor: Any) -> None:
        self.gw, self.service, self.descriptor = gw, service, descriptor

    def _scopes(self, method: str) -> tuple[str, ...]:
        return ("admin",) if self.service == "inference" and method in ADMIN_METHODS else (self.SCOPES[self.service],)

    def handler(self) -> grpc.GenericRpcHandler:
        handlers = {m.name: self._method(m) for m in self.descriptor.methods}
        return grpc.method_handlers_generic_handler(self.descriptor.full_name, handlers)

    def _method(self, method: Any) -> grpc.RpcMethodHandler:
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        path = f"/{self.descriptor.full_name}/{method.name}"
        channel = self.gw.backends.channels[self.service]
        codec = {"request_serializer": request_cls.SerializeToString, "response_deserializer": response_cls.FromString}
        kinds: dict[tuple[bool, bool], tuple[Callable[..., Any], Callable[..., Any], Any]] = {
            (False, False): (grpc.unary_unary_rpc_method_handler, self._unary, channel.unary_unary(path, **codec)),
            (False, True): (
                grpc.unary_stream_rpc_method_handler,
                self._server_stream,
                channel.unary_stream(path, **codec),
            ),
            (True, False): (
                grpc.stream_unary_rpc_method_handler,
                self._client_stream,
                channel.stream_unary(path, **codec),
            ),
            (True, True): (grpc.stream_stream_rpc_method_handler, self._bidi, channel.stream_stream(path, **codec)),
        }
        make, wrap, call = kinds[(method.client_streaming, method.server_streaming)]
        return make(  # type: ignore[no-any-return]
            wrap(method.name, call),
            request_deserializer=request_cls.FromString,
            response_serializer=response_cls.SerializeToString,
        )

    async def _admit(self, method: str, context: Any) -> KeyRecord:
        return await authorize(self.gw, context, self._scopes(method))

    async def _charge(self, key: KeyRecord, response: Any) -> None:
        if isinstance(response, ipb.GenerateResponse) and response.HasField("usage"):
            await self.gw.quotas.charge(key, response.usage.prompt_tokens + response.usage.completion_tokens)

    def _unary(self, method: str, call: Any) -> Callable[..., Any]:
        async def run(request: Any, context: Any) -> Any:
            key = await self._admit(method, context)
            check_paths(method, request)
            response = await backends.unary(self.service, call, request)
            await self._charge(key, response)
            return response

        return run

    def _server_stream(self, method: str, call: Any) -> Callable[..., Any]:
        async def run(request: Any, context: Any) -> AsyncIterator[Any]:
            key = await self._admit(method, context)
            check_paths(method, request)
            async for response in backends.stream(self.service, call, request):
                await self._charge(key, response)
                yield response

        return run

    def _checked(self, method: str, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async def each() -> AsyncIterator[Any]:
            async for request in requests:
                check_paths(method, request)
                yield request

        return each()

    def _client_stream(self, method: str, call: Any) -> Callable[..., Any]:
        async def run(requests: AsyncIterator[Any], context: Any) -> Any:
            await self._admit(method, context)
            with backends.translated(self.service):
                return await call(self._checked(method, requests), **backends.call_options())

        return run

    def _bidi(self, method: str, call: Any) -> Callable[..., Any]:
        async def run(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
            await self._admit(method, context)
            stream = call(self._checked(method, requests), **backends.call_options())
            try:
                with backends.translated(self.service):
                    async for response in stream:
                        yield response
            finally:
                stream.cancel()

        return run


BACKEND_SERVICES = {
    "tokenizer": tpb.DESCRIPTOR.services_by_name["TokenizerService"],
    "retrieval": rpb.DESCRIPTOR.services_by_name["RetrievalService"],
    "training": jpb.DESCRIPTOR.services_by_name["TrainingService"],
    "inference": ipb.DESCRIPTOR.services_by_name["InferenceService"],
}


def registrations(gw: Gateway) -> list[Registration]:
    """GatewayService and the four proxied services, for the server kit."""
    out = [Registration(pb_grpc.add_GatewayServiceServicer_to_server, GatewayServicer(gw), SERVICE_NAME)]
    for name, descriptor in BACKEND_SERVICES.items():
        handler = Proxy(gw, name, descriptor).handler()
        out.append(Registration(lambda h, server: server.add_generic_rpc_handlers((h,)), handler, descriptor.full_name))
    return out
