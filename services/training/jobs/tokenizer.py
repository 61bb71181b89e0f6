"""The tokeniser a job trains with, as the tokeniser service describes it, and the special tokens a job needs."""

from __future__ import annotations

from typing import Any

import grpc
from llmp.tokenizer.v1.tokenizer_pb2 import TokenizerInfo

from libs.common.errors import InvalidArgument, NotFound, Unavailable
from services.training.jobs import JobContext

EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "[SEP]")


def describe_tokenizer(context: JobContext, ref: str) -> TokenizerInfo:
    """The tokeniser's description from the tokeniser service; it must have an end-of-document token."""
    try:
        info = context.tokenizer.describe(ref)
    except grpc.RpcError as e:
        if e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
            raise NotFound(f"the tokeniser service has no tokenizer {ref!r}", field="config.tokenizer") from None
        raise Unavailable(f"the tokeniser service cannot be reached: {e.code().name}") from None
    return info


def end_of_document_token(cfg: Any, info: TokenizerInfo) -> str:
    """The special token appended after every document: `eos_token`, else the first usual one present."""
    return special_token(info, cfg.eos_token, EOS_TOKENS, "eos_token", "end-of-document")


def special_token(info: TokenizerInfo, chosen: str, usual: tuple[str, ...], field_name: str, role: str) -> str:
    """`chosen` if the tokeniser has it as a special token, else the first of `usual` it has; refused otherwise."""
    if chosen:
        if chosen not in info.special_tokens:
            raise InvalidArgument(f"{chosen!r} is not a special token of {info.ref}", field=f"config.{field_name}")
        return chosen
    found = next((t for t in usual if t in info.special_tokens), None)
    if found is None:
        raise InvalidArgument(
            f"{info.ref} has no {role} token (none of {usual}; its special tokens: {list(info.special_tokens)}); "
            f"use a tokenizer with one or name it in {field_name}",
            field=f"config.{field_name}",
        )
    return found


def token_id(context: JobContext, tokenizer: str, token: str) -> int:
    return int(context.tokenizer.encode(tokenizer, token, add_special_tokens=False).ids[0])
