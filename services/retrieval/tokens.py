"""Token counting for chunking and context budgets: a local tokeniser, or one in the tokenizer service.

Both give the same two answers: character offsets of each token of a text (for token windows)
and token counts of several texts (for packing and budgets), special tokens excluded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import grpc
from llmp.tokenizer.v1 import tokenizer_pb2 as pb
from tokenizers import Tokenizer

from libs.common.clients.tokenizer import TokenizerClient
from libs.common.errors import InvalidArgument, LlmpError, NotFound, Unavailable


def _mapped(e: grpc.RpcError, field: str) -> LlmpError:
    """The tokenizer service's refusal, as this service's own error on the field that named it."""
    code, details = e.code(), e.details()
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(f"tokenizer service: {details}", field=field)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(f"tokenizer service: {details}", field=field)
    return Unavailable(f"tokenizer service: {code.name}: {details}", field=field)


class TokenCounter(Protocol):
    def offsets(self, text: str) -> list[tuple[int, int]]: ...

    def count(self, texts: Sequence[str]) -> list[int]: ...


class LocalTokens:
    """A `tokenizers.Tokenizer` in this process (usually the embedder's own)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def offsets(self, text: str) -> list[tuple[int, int]]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).offsets)

    def count(self, texts: Sequence[str]) -> list[int]:
        return [len(e.ids) for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]


class ServiceTokens:
    """A tokenizer of the tokenizer service, by name, over gRPC."""

    def __init__(self, client: TokenizerClient, name: str, field: str) -> None:
        self.stub = client.stub
        self.name = name
        #: The request field that named the tokenizer, for errors.
        self.field = field

    def offsets(self, text: str) -> list[tuple[int, int]]:
        request = pb.EncodeRequest(tokenizer=self.name, text=text, add_special_tokens=False, return_offsets=True)
        try:
            reply = self.stub.Encode(request)
        except grpc.RpcError as e:
            raise _mapped(e, self.field) from None
        return [(o.start, o.end) for o in reply.offsets]

    def count(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        request = pb.CountTokensRequest(tokenizer=self.name, texts=list(texts), add_special_tokens=False)
        try:
            reply = self.stub.CountTokens(request)
        except grpc.RpcError as e:
            raise _mapped(e, self.field) from None
        return list(reply.counts)
