"""gRPC adapter of the inference core: proto in -> core call -> proto out, nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from importlib import metadata
from typing import Any

from llmp.inference.v1 import inference_pb2 as pb
from llmp.inference.v1 import inference_pb2_grpc as pb_grpc

from libs.common.errors import InvalidArgument
from libs.common.structs import plain_struct
from services.inference.core import InferenceCore
from services.inference.engine import SamplingParams, TokenLogprob
from services.inference.schema import (
    Chunk,
    EngineOptions,
    GenerateInput,
    ModelSpec,
    ModelStatus,
    ReplicaOptions,
)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name


def _set(message: Any, name: str, default: Any) -> Any:
    """An optional field's value, or `default` when the caller left it unset."""
    return getattr(message, name) if message.HasField(name) else default


def sampling_params(r: pb.GenerateRequest, defaults: SamplingParams = SamplingParams()) -> SamplingParams:
    """The request's sampling fields; those it leaves unset take `defaults` (the model's)."""
    return SamplingParams(
        max_tokens=_set(r, "max_tokens", defaults.max_tokens),
        temperature=_set(r, "temperature", defaults.temperature),
        top_k=r.top_k or defaults.top_k,
        top_p=_set(r, "top_p", defaults.top_p),
        min_p=r.min_p,
        repetition_penalty=_set(r, "repetition_penalty", defaults.repetition_penalty),
        presence_penalty=r.presence_penalty,
        frequency_penalty=r.frequency_penalty,
        logit_bias=dict(r.logit_bias),
        seed=_set(r, "seed", None),
        n=_set(r, "n", defaults.n),
        stop_token_ids=tuple(r.stop_token_ids),
        stop=tuple(r.stop),
        ignore_eos=r.ignore_eos,
        logprobs=_set(r, "logprobs", None),
        beam_width=max(1, r.beam_width),
        length_penalty=_set(r, "length_penalty", defaults.length_penalty),
        early_stopping=early_stopping(r.early_stopping),
        adapter=r.adapter or None,
        processors=tuple(plain_struct(s, f"processors[{i}]") for i, s in enumerate(r.processors)),
    )


def early_stopping(value: str) -> bool | str:
    rules: dict[str, bool | str] = {"": False, "false": False, "true": True, "never": "never"}
    if value.lower() not in rules:
        raise InvalidArgument('must be "true", "false" or "never"', field="early_stopping")
    return rules[value.lower()]


def generate_input(r: pb.GenerateRequest, defaults: SamplingParams = SamplingParams()) -> GenerateInput:
    kind = r.WhichOneof("prompt")
    return GenerateInput(
        request_id=r.request_id,
        params=sampling_params(r, defaults),
        text=r.text if kind == "text" else None,
        token_ids=tuple(r.token_ids.ids) if kind == "token_ids" else None,
        messages=tuple((m.role, m.content) for m in r.messages.messages) if kind == "messages" else None,
    )


def model_spec(r: pb.LoadModelRequest) -> ModelSpec:
    rd, ed = ReplicaOptions(), EngineOptions()
    rp, ep = r.replicas, r.engine
    replicas = ReplicaOptions(
        min_replicas=_set(rp, "min_replicas", rd.min_replicas),
        max_replicas=_set(rp, "max_replicas", rd.max_replicas),
        target_ongoing_requests=rp.target_ongoing_requests,
        max_ongoing_requests=_set(rp, "max_ongoing_requests", rd.max_ongoing_requests),
        max_queued_requests=_set(rp, "max_queued_requests", rd.max_queued_requests),
        num_cpus=_set(rp, "num_cpus", rd.num_cpus),
        num_gpus=rp.num_gpus,
        memory_bytes=rp.memory_bytes,
    )
    engine = EngineOptions(
        kv_cache_bytes=ep.kv_cache_bytes or ed.kv_cache_bytes,
        dtype=ep.dtype or ed.dtype,
        max_model_len=ep.max_model_len,
        max_num_seqs=ep.max_num_seqs or ed.max_num_seqs,
        max_num_batched_tokens=ep.max_num_batched_tokens or ed.max_num_batched_tokens,
        quantization=ep.quantization,
        speculative=ep.speculative,
        rope_scaling=ep.rope_scaling,
        compile=ep.compile,
        sliding_window=_set(ep, "sliding_window", None),
        packed_only=ep.packed_only,
    )
    parts = r.path.split("/")
    default_name = parts[-2] if len(parts) >= 2 and parts[-1].isdigit() else parts[-1]
    return ModelSpec(r.name or default_name, r.path, replicas, engine)


def logprob_pb(lp: TokenLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, top=lp.top)


def response_pb(model: str, chunk: Chunk) -> pb.GenerateResponse:
    out = pb.GenerateResponse(request_id=chunk.request_id, model=model)
    for c in chunk.completions:
        out.completions.append(
            pb.Completion(
                index=c.index,
                text=c.text,
                token_ids=c.token_ids,
                logprobs=[logprob_pb(lp) for lp in c.logprobs],
                finish_reason=c.finish_reason or "",
                draft_tokens=c.draft_tokens,
                accepted_draft_tokens=c.accepted_draft_tokens,
            )
        )
    if chunk.finished:
        out.usage.CopyFrom(
            pb.Usage(
                prompt_tokens=chunk.prompt_tokens,
                completion_tokens=chunk.completion_tokens,
                cached_tokens=chunk.cached_tokens,
            )
        )
    return out


def model_info_pb(status: ModelStatus) -> pb.ModelInfo:
    spec, facts, load = status.spec, status.facts, status.load
    return pb.ModelInfo(
        name=spec.name,
        path=spec.path,
        model_type=facts.model_type,
        context_length=status.context_length,
        dtype=spec.engine.dtype,
        quantization=spec.engine.quantization or "none",
        vocab_size=facts.vocab_size,
        has_tokenizer=facts.has_tokenizer,
        has_chat_template=facts.has_chat_template,
        adapters=status.adapters,
        replicas=pb.ReplicaOptions(**vars(spec.replicas)),
        engine=pb.EngineOptions(**vars(spec.engine)),
        load=pb.ModelLoad(**vars(load)),
    )


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, core: InferenceCore) -> None:
        self.core = core

    def _input(self, request: pb.GenerateRequest) -> GenerateInput:
        return generate_input(request, self.core.sampling_defaults(request.model))

    async def Generate(self, request: pb.GenerateRequest, context: Any) -> pb.GenerateResponse:
        return response_pb(request.model, await self.core.generate(request.model, self._input(request)))

    async def GenerateStream(self, request: pb.GenerateRequest, context: Any) -> AsyncIterator[pb.GenerateResponse]:
        async for chunk in self.core.stream(request.model, self._input(request)):
            yield response_pb(request.model, chunk)

    async def Abort(self, request: pb.AbortRequest, context: Any) -> pb.AbortResponse:
        self.core.abort(request.request_id)
        return pb.AbortResponse()

    async def ListModels(self, request: pb.ListModelsRequest, context: Any) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[model_info_pb(s) for s in await self.core.list_models()])

    async def LoadModel(self, request: pb.LoadModelRequest, context: Any) -> pb.ModelInfo:
        return model_info_pb(await self.core.load_model(model_spec(request)))

    async def UnloadModel(self, request: pb.UnloadModelRequest, context: Any) -> pb.UnloadModelResponse:
        await self.core.unload_model(request.model)
        return pb.UnloadModelResponse()

    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context: Any) -> pb.ModelInfo:
        return model_info_pb(await self.core.load_adapter(request.model, request.name, request.path))

    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest, context: Any) -> pb.ModelInfo:
        return model_info_pb(await self.core.unload_adapter(request.model, request.name))

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: Any) -> pb.ModelInfo:
        return model_info_pb(await self.core.model_info(request.model))

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context: Any) -> pb.ServerInfo:
        return pb.ServerInfo(
            version=metadata.version("llmp"),
            backend=self.core.backend.name,
            dashboard_url=self.core.backend.dashboard_url,
            models=self.core.model_names(),
            max_tokens=self.core.limits.max_tokens,
            max_n=self.core.limits.max_n,
        )
