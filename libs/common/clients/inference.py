"""Client of the inference service (`llmp.inference.v1`).

client = InferenceClient()                      # LLMP_INFERENCE_ADDRESS
client.load("models/tiny/1")                    # a model folder of the artifact store
reply = client.generate("tiny", text="Once upon", max_tokens=32, temperature=0)
for message in client.stream("tiny", messages=[{"role": "user", "content": "hi"}]):
    print(message.completions[0].text, end="")

`generate_request` builds the request from plain values (None leaves a field unset, so the
service's default applies); the gateway builds its requests with it too.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grpc
from llmp.inference.v1 import inference_pb2 as pb
from llmp.inference.v1 import inference_pb2_grpc as pb_grpc

from libs.common.rpc.client import address, channel

# Optional proto fields: None leaves them unset (the service's default); repeated and map fields
# take sequences and mappings.
_OPTIONAL = ("max_tokens", "temperature", "top_p", "repetition_penalty", "seed", "n", "logprobs", "length_penalty")


def generate_request(
    model: str,
    *,
    text: str | None = None,
    token_ids: Sequence[int] | None = None,
    messages: Sequence[Mapping[str, str]] | None = None,
    logit_bias: Mapping[int, float] | None = None,
    **sampling: Any,
) -> pb.GenerateRequest:
    """A GenerateRequest with one prompt form (text, token ids or chat messages) and sampling values."""
    request = pb.GenerateRequest(model=model)
    if text is not None:
        request.text = text
    elif token_ids is not None:
        request.token_ids.ids.extend(token_ids)
    elif messages is not None:
        request.messages.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    for name, value in sampling.items():
        if value is None:
            continue
        if name in ("stop", "stop_token_ids"):
            getattr(request, name).extend(value)
        elif name in _OPTIONAL or hasattr(request, name):
            setattr(request, name, value)
    if logit_bias:
        request.logit_bias.update(logit_bias)
    return request


class InferenceClient:
    def __init__(self, target: str | None = None, ch: grpc.Channel | None = None) -> None:
        self.channel = ch or channel(target or address("inference"))
        self.stub = pb_grpc.InferenceServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def generate(self, model: str, **prompt_and_sampling: Any) -> pb.GenerateResponse:
        return self.stub.Generate(generate_request(model, **prompt_and_sampling))

    def stream(self, model: str, **prompt_and_sampling: Any) -> Iterator[pb.GenerateResponse]:
        """Messages as tokens come; closing the iterator early cancels the request."""
        return iter(self.stub.GenerateStream(generate_request(model, **prompt_and_sampling)))

    def abort(self, request_id: str) -> None:
        self.stub.Abort(pb.AbortRequest(request_id=request_id))

    def load(
        self, path: str, name: str = "", replicas: pb.ReplicaOptions | None = None,
        engine: pb.EngineOptions | None = None, timeout: float | None = None,
    ) -> pb.ModelInfo:  # fmt: skip
        request = pb.LoadModelRequest(path=path, name=name, replicas=replicas, engine=engine)
        return self.stub.LoadModel(request, timeout=timeout)

    def unload(self, model: str) -> None:
        self.stub.UnloadModel(pb.UnloadModelRequest(model=model))

    def models(self) -> list[pb.ModelInfo]:
        return list(self.stub.ListModels(pb.ListModelsRequest()).models)

    def model(self, name: str) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(model=name))

    def server_info(self) -> pb.ServerInfo:
        return self.stub.GetServerInfo(pb.GetServerInfoRequest())
