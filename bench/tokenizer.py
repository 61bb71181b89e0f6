"""Tokeniser service benchmarks, against Hugging Face `tokenizers` called in-process in the same run.

1. Batched encode over gRPC vs in-process `encode_batch` on the same texts and tokenizer
   (target >= 0.8x the in-process throughput for batches of >= 64 documents).
2. Byte-level BPE training, 32k vocabulary, on the standard library's source: the service
   (check the corpus, train in a worker process, save a version, report) vs `Tokenizer.train`
   and `Tokenizer.save` on the same files (target <= 1.1x the time).

Run: python -m bench tokenizer
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from llmp.tokenizer.v1 import tokenizer_pb2 as pb
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from libs.common import corpora
from libs.common.clients.tokenizer import TokenizerClient
from tests.helpers.services import start_service

VOCAB = 32000
REPEATS = 5


def train_direct(files: list[str], out: Path) -> float:
    """Train and save, as a user calling the library would."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    start = time.perf_counter()
    tokenizer.train(files, trainer)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(out))
    return time.perf_counter() - start


def train_service(client: TokenizerClient, name: str) -> float:
    start = time.perf_counter()
    final = client.train(name, "byte_level_bpe", VOCAB, corpus=["stdlib"])
    elapsed = time.perf_counter() - start
    assert final.state == pb.TrainingStatus.SUCCEEDED, final.error
    return elapsed


def encode_throughput(fn, batches: list[list[str]]) -> float:
    """Documents per second, the median of REPEATS passes over all batches."""
    rates = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        for batch in batches:
            fn(batch)
        rates.append(sum(map(len, batches)) / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    with tempfile.TemporaryDirectory() as home:
        service = start_service("tokenizer", Path(home))
        try:
            run(TokenizerClient(service.address), Path(home))
        finally:
            service.stop()


def run(client: TokenizerClient, home: Path) -> None:
    documents = [text for _, text in corpora.stdlib_source()]
    client.upload("stdlib", documents)
    files = sorted(str(p) for p in (home / "artifacts" / "corpora" / "stdlib").glob("part-*.txt"))
    size_mb = sum(Path(f).stat().st_size for f in files) / 1e6

    print(f"\n== tokenizer: byte-level BPE training, vocab {VOCAB}, stdlib source ({size_mb:.1f} MB) ==")
    out = home / "direct-tokenizer.json"
    direct = [train_direct(files, out)]
    served = [train_service(client, "bench-bpe")]
    direct.append(train_direct(files, out))
    served.append(train_service(client, "bench-bpe"))
    d, s = min(direct), min(served)
    print(f"tokenizers direct  {d:7.2f} s   (runs: {', '.join(f'{x:.2f}' for x in direct)})")
    print(f"llmp service       {s:7.2f} s   (runs: {', '.join(f'{x:.2f}' for x in served)})")
    print(f"ratio service/direct = {s / d:.3f}x   (target <= 1.1x)")

    info = client.describe("bench-bpe")
    local = Tokenizer.from_file(str(home / "artifacts" / info.path / "tokenizer.json"))
    print("\n== tokenizer: batched encode, gRPC vs in-process, same tokenizer and texts ==")
    print(f"{'batch':>6} {'in-process docs/s':>18} {'gRPC docs/s':>12} {'ratio':>7}  target")
    for batch_size in (64, 256):
        batches = [documents[i : i + batch_size] for i in range(0, 8 * batch_size, batch_size)]

        def in_process(batch: list[str]) -> list[list[int]]:
            return [e.ids for e in local.encode_batch(batch)]

        def over_grpc(batch: list[str]) -> list[list[int]]:
            reply = client.stub.EncodeBatch(pb.EncodeBatchRequest(tokenizer=info.ref, texts=batch))
            return [list(e.ids) for e in reply.encodings]

        assert over_grpc(batches[0]) == in_process(batches[0])
        local_rate = encode_throughput(in_process, batches)
        grpc_rate = encode_throughput(over_grpc, batches)
        print(f"{batch_size:>6} {local_rate:>18.0f} {grpc_rate:>12.0f} {grpc_rate / local_rate:>6.3f}x  >= 0.8x")


if __name__ == "__main__":
    main()
