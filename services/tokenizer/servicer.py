"""gRPC adapter of the tokeniser core: proto in -> core call -> proto out, nothing else.

Blocking work (training checks, encoding, imports) runs in worker threads so the event loop
keeps serving other calls; Hugging Face `tokenizers` releases the GIL while it encodes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import grpc
from llmp.tokenizer.v1 import tokenizer_pb2 as pb
from llmp.tokenizer.v1 import tokenizer_pb2_grpc as pb_grpc
from tokenizers import Encoding

from libs.common.rpc.pools import run_blocking
from libs.common.structs import struct_field
from services.tokenizer.core import Padding, TokenizerCore, Truncation
from services.tokenizer.store import TokenizerInfo
from services.tokenizer.training import JobStatus

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TokenizerService"].full_name


def status_pb(status: JobStatus) -> pb.TrainingStatus:
    fields = dataclasses.asdict(status)
    fields["state"] = pb.TrainingStatus.State.Value(status.state)
    return pb.TrainingStatus(**fields)


def info_pb(info: TokenizerInfo) -> pb.TokenizerInfo:
    return pb.TokenizerInfo(**dataclasses.asdict(info))


def encoding_pb(e: Encoding, tokens: bool, offsets: bool, masks: bool) -> pb.Encoding:
    out = pb.Encoding(ids=e.ids)
    if tokens:
        out.tokens.extend(e.tokens)
    if offsets:
        out.offsets.extend(pb.Offset(start=s, end=t) for s, t in e.offsets)
    if masks:
        out.attention_mask.extend(e.attention_mask)
        out.special_tokens_mask.extend(e.special_tokens_mask)
        out.type_ids.extend(e.type_ids)
    for extra in e.overflowing:
        out.overflowing.append(encoding_pb(extra, tokens, offsets, masks))
    return out


def _options(request: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        "add_special_tokens": request.add_special_tokens if request.HasField("add_special_tokens") else True,
    }
    if request.HasField("truncation") and request.truncation.max_length:
        t = request.truncation
        options["truncation"] = Truncation(
            t.max_length, t.stride, t.strategy or "longest_first", t.direction or "right"
        )
    if request.HasField("padding"):
        p = request.padding
        options["padding"] = Padding(p.length, p.direction or "right", p.pad_to_multiple_of)
    return options


def _shape(request: Any, options: dict[str, Any]) -> tuple[bool, bool, bool]:
    return request.return_tokens, request.return_offsets, request.return_masks or "padding" in options


class TokenizerServicer(pb_grpc.TokenizerServiceServicer):
    #: Methods that may take long (see libs/common/rpc/pools.py).
    SLOW_METHODS = frozenset({"Train", "WatchTraining", "CancelTraining", "UploadCorpus", "Import", "VocabReport"})

    def __init__(self, core: TokenizerCore) -> None:
        self.core = core

    async def Train(self, request: pb.TrainRequest, context: grpc.aio.ServicerContext) -> pb.TrainResponse:
        status = await run_blocking(
            self.core.train,
            name=request.name,
            algorithm=request.algorithm,
            vocab_size=request.vocab_size,
            corpus_refs=list(request.corpus),
            texts=list(request.texts),
            special_tokens=list(request.special_tokens),
            min_frequency=request.min_frequency,
            normalizer=request.normalizer,
            pre_tokenizer=request.pre_tokenizer,
            chat_template=request.chat_template,
            params=struct_field(request, "params"),
            model_max_length=request.model_max_length,
        )
        return pb.TrainResponse(job_id=status.job_id, status=status_pb(status))

    async def WatchTraining(self, request: pb.WatchTrainingRequest, context: Any) -> AsyncIterator[pb.TrainingStatus]:
        async for status in self.core.watch_training(request.job_id):
            yield status_pb(status)

    async def CancelTraining(self, request: pb.CancelTrainingRequest, context: Any) -> pb.TrainingStatus:
        return status_pb(await run_blocking(self.core.cancel_training, request.job_id))

    async def UploadCorpus(self, requests: AsyncIterator[pb.CorpusChunk], context: Any) -> pb.UploadCorpusResponse:
        async def chunks() -> AsyncIterator[tuple[str, str, bool]]:
            async for chunk in requests:
                yield chunk.name, chunk.text, chunk.new_document

        name, size, documents = await self.core.upload_corpus(chunks())
        return pb.UploadCorpusResponse(corpus=name, bytes=size, documents=documents)

    async def Import(self, request: pb.ImportRequest, context: Any) -> pb.TokenizerInfo:
        info = await run_blocking(
            self.core.import_tokenizer, request.name, request.path, request.data, request.format, request.chat_template
        )
        return info_pb(info)

    async def Encode(self, request: pb.EncodeRequest, context: Any) -> pb.Encoding:
        options = _options(request)
        encoding = await run_blocking(self.core.encode, request.tokenizer, request.text, request.pair, **options)
        return encoding_pb(encoding, *_shape(request, options))

    async def EncodeBatch(self, request: pb.EncodeBatchRequest, context: Any) -> pb.EncodeBatchResponse:
        options = _options(request)
        encodings = await run_blocking(
            self.core.encode_batch, request.tokenizer, request.texts, request.pairs, **options
        )
        shape = _shape(request, options)
        return pb.EncodeBatchResponse(encodings=[encoding_pb(e, *shape) for e in encodings])

    async def EncodeStream(self, requests: AsyncIterator[pb.EncodeRequest], context: Any) -> AsyncIterator[pb.Encoding]:
        async for request in requests:
            yield await self.Encode(request, context)

    async def Decode(self, request: pb.DecodeRequest, context: Any) -> pb.DecodeResponse:
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        text = await run_blocking(self.core.decode, request.tokenizer, list(request.ids), skip)
        return pb.DecodeResponse(text=text)

    async def DecodeBatch(self, request: pb.DecodeBatchRequest, context: Any) -> pb.DecodeBatchResponse:
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        sequences = [list(s.ids) for s in request.sequences]
        return pb.DecodeBatchResponse(
            texts=await run_blocking(self.core.decode_batch, request.tokenizer, sequences, skip)
        )

    async def CountTokens(self, request: pb.CountTokensRequest, context: Any) -> pb.CountTokensResponse:
        add = request.add_special_tokens if request.HasField("add_special_tokens") else True
        counts = await run_blocking(self.core.count_tokens, request.tokenizer, request.texts, add)
        return pb.CountTokensResponse(counts=counts, total=sum(counts))

    async def ApplyChatTemplate(
        self, request: pb.ApplyChatTemplateRequest, context: Any
    ) -> pb.ApplyChatTemplateResponse:
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        text, ids = await run_blocking(
            self.core.apply_chat_template, request.tokenizer, messages, request.add_generation_prompt
        )
        return pb.ApplyChatTemplateResponse(text=text, ids=ids)

    async def List(self, request: pb.ListRequest, context: Any) -> pb.ListResponse:
        infos = await run_blocking(self.core.list_tokenizers, request.prefix)
        return pb.ListResponse(tokenizers=[info_pb(i) for i in infos])

    async def Describe(self, request: pb.DescribeRequest, context: Any) -> pb.TokenizerInfo:
        return info_pb(await run_blocking(self.core.describe, request.tokenizer))

    async def Delete(self, request: pb.DeleteRequest, context: Any) -> pb.DeleteResponse:
        return pb.DeleteResponse(deleted=await run_blocking(self.core.delete, request.tokenizer))

    async def VocabReport(self, request: pb.VocabReportRequest, context: Any) -> AsyncIterator[pb.VocabReportRow]:
        rows = self.core.vocab_report(
            list(request.corpus),
            list(request.texts),
            request.algorithm,
            list(request.vocab_sizes),
            request.embedding_dim or 4096,
            request.bytes_per_param or 2,
            request.holdout_fraction or 0.1,
        )
        while (row := await run_blocking(next, rows, None)) is not None:
            yield pb.VocabReportRow(**dataclasses.asdict(row))
