"""Client of the gateway's gRPC side (`llmp.gateway.v1`): keys, the RAG answer, the planners.

client = GatewayClient()                        # LLMP_GATEWAY_ADDRESS, key from api_key()
new = client.create_key("ci", ["inference"], ttl_seconds=3600)
print(new.key)                                  # shown once
reply = client.answer("docs", "How do I ...?", model="tiny")

The backends' own clients work through the gateway too: point LLMP_<NAME>_ADDRESS at it and set
LLMP_API_KEY (what `llmp --gateway` does); every call then carries the key.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from llmp.gateway.v1 import gateway_pb2 as pb
from llmp.gateway.v1 import gateway_pb2_grpc as pb_grpc

from libs.common.errors import Unauthenticated
from libs.common.rpc.client import address, channel
from libs.common.settings import llmp_home

ADMIN_KEY_FILE = "secrets/admin.key"


def api_key() -> str:
    """LLMP_API_KEY, else the first admin key the local gateway wrote under $LLMP_HOME."""
    key = os.environ.get("LLMP_API_KEY", "").strip()
    if key:
        return key
    path = Path(llmp_home()) / ADMIN_KEY_FILE
    try:
        return path.read_text().strip()
    except OSError:
        raise Unauthenticated(f"no API key: set LLMP_API_KEY or start the gateway once to create {path}") from None


class GatewayClient:
    def __init__(self, target: str | None = None, key: str | None = None, ch: grpc.Channel | None = None) -> None:
        self.channel = ch or channel(target or address("gateway"))
        self.stub = pb_grpc.GatewayServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {key or api_key()}"),)

    def close(self) -> None:
        self.channel.close()

    def create_key(
        self, name: str, scopes: list[str], ttl_seconds: float = 0, requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
    ) -> pb.CreateKeyResponse:  # fmt: skip
        request = pb.CreateKeyRequest(name=name, scopes=scopes, ttl_seconds=ttl_seconds)
        if requests_per_minute is not None:
            request.requests_per_minute = requests_per_minute
        if tokens_per_minute is not None:
            request.tokens_per_minute = tokens_per_minute
        return self.stub.CreateKey(request, metadata=self.metadata)

    def list_keys(self) -> list[pb.ApiKey]:
        return list(self.stub.ListKeys(pb.ListKeysRequest(), metadata=self.metadata).keys)

    def revoke_key(self, key_id: str) -> pb.ApiKey:
        return self.stub.RevokeKey(pb.RevokeKeyRequest(id=key_id), metadata=self.metadata)

    def whoami(self) -> pb.ApiKey:
        return self.stub.WhoAmI(pb.WhoAmIRequest(), metadata=self.metadata)

    def answer(self, collection: str, question: str, model: str, **options: Any) -> pb.AnswerResponse:
        request = pb.AnswerRequest(collection=collection, question=question, model=model, **options)
        return self.stub.Answer(request, metadata=self.metadata)

    def answer_stream(self, collection: str, question: str, model: str, **options: Any) -> Iterator[pb.AnswerResponse]:
        request = pb.AnswerRequest(collection=collection, question=question, model=model, **options)
        return iter(self.stub.AnswerStream(request, metadata=self.metadata))
