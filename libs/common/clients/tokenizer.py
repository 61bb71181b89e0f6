"""Client of the tokeniser service (`llmp.tokenizer.v1`).

client = TokenizerClient()                      # LLMP_TOKENIZER_ADDRESS
client.upload("stdlib", texts)                  # a corpus in the artifact store
status = client.train("code", "byte_level_bpe", 32000, corpus=["stdlib"])
ids = client.encode_batch("code", ["def f(): pass"])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc
from llmp.tokenizer.v1 import tokenizer_pb2 as pb
from llmp.tokenizer.v1 import tokenizer_pb2_grpc as pb_grpc

from libs.common.rpc.client import address, channel

CHUNK_CHARS = 1 << 20


def chunks(name: str, documents: Iterable[str], chunk_chars: int = CHUNK_CHARS) -> Iterator[pb.CorpusChunk]:
    """Split documents into upload messages of at most `chunk_chars` characters."""
    for document in documents:
        for start in range(0, max(len(document), 1), chunk_chars):
            yield pb.CorpusChunk(name=name, text=document[start : start + chunk_chars], new_document=start == 0)


class TokenizerClient:
    def __init__(self, target: str | None = None, ch: grpc.Channel | None = None) -> None:
        self.channel = ch or channel(target or address("tokenizer"))
        self.stub = pb_grpc.TokenizerServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def upload(self, name: str, documents: Iterable[str]) -> pb.UploadCorpusResponse:
        return self.stub.UploadCorpus(chunks(name, documents))

    def train(
        self,
        name: str,
        algorithm: str,
        vocab_size: int,
        corpus: Iterable[str] = (),
        texts: Iterable[str] = (),
        wait: bool = True,
        on_progress: Callable[[pb.TrainingStatus], None] | None = None,
        **options: Any,
    ) -> pb.TrainingStatus:
        """Start training; with `wait`, follow the job to its end and return the final status."""
        reply = self.stub.Train(
            pb.TrainRequest(
                name=name, algorithm=algorithm, vocab_size=vocab_size, corpus=list(corpus), texts=list(texts), **options
            )
        )
        if not wait:
            return reply.status
        final = reply.status
        for status in self.stub.WatchTraining(pb.WatchTrainingRequest(job_id=reply.job_id)):
            final = status
            if on_progress is not None:
                on_progress(status)
        return final

    def encode_batch(self, tokenizer: str, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        reply = self.stub.EncodeBatch(
            pb.EncodeBatchRequest(tokenizer=tokenizer, texts=texts, add_special_tokens=add_special_tokens)
        )
        return [list(e.ids) for e in reply.encodings]

    def encode(self, tokenizer: str, text: str, **options: Any) -> pb.Encoding:
        return self.stub.Encode(pb.EncodeRequest(tokenizer=tokenizer, text=text, **options))

    def decode(self, tokenizer: str, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.stub.Decode(
            pb.DecodeRequest(tokenizer=tokenizer, ids=ids, skip_special_tokens=skip_special_tokens)
        ).text

    def count_tokens(self, tokenizer: str, texts: list[str]) -> list[int]:
        return list(self.stub.CountTokens(pb.CountTokensRequest(tokenizer=tokenizer, texts=texts)).counts)

    def describe(self, tokenizer: str) -> pb.TokenizerInfo:
        return self.stub.Describe(pb.DescribeRequest(tokenizer=tokenizer))

    def list_tokenizers(self, prefix: str = "") -> list[pb.TokenizerInfo]:
        return list(self.stub.List(pb.ListRequest(prefix=prefix)).tokenizers)

    def exists(self, tokenizer: str) -> bool:
        try:
            self.describe(tokenizer)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise
        return True

    def vocab_report(
        self, algorithm: str, vocab_sizes: list[int], corpus: Iterable[str] = (), **options: Any
    ) -> Iterator[pb.VocabReportRow]:
        request = pb.VocabReportRequest(algorithm=algorithm, vocab_sizes=vocab_sizes, corpus=list(corpus), **options)
        return iter(self.stub.VocabReport(request))
