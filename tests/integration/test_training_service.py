"""The training service as a real process: real Redis, the real tokeniser service, Ray Train, gRPC.

The session's training stack (tests/helpers/training_stack.py): a byte-level BPE tokeniser on
`pydoc_data.topics` and tiny Llama models trained on that text by Ray Train workers.
"""

from __future__ import annotations

import grpc
import pytest
import torch
from click.testing import CliRunner
from llmp.training.v1 import training_pb2 as pb
from transformers import AutoModelForCausalLM

from libs.common import corpora
from libs.common.cli import training as cli_training
from tests.helpers.training_stack import TINY, WATCH_TIMEOUT_S, Stack, follow_until, refused

pytestmark = pytest.mark.integration


def test_pretraining_runs_on_two_workers_and_registers_a_loadable_model(stack: Stack) -> None:
    client = stack.client
    job = client.submit("pretrain", TINY, client_token="first-tiny")
    assert client.submit("pretrain", TINY, client_token="first-tiny").job_id == job.job_id
    assert job.config["tokenizer"] == "topics-bpe:1"

    losses, states, logs = [], [], []
    for event in client.watch(job.job_id, timeout=WATCH_TIMEOUT_S):
        if event.HasField("progress"):
            losses.append(event.progress.loss)
        if not states or states[-1] != event.job.state:
            states.append(event.job.state)
        logs.append(event.log)
    final = client.get(job.job_id)
    assert final.state == pb.Job.SUCCEEDED, f"{final.reason}\n{stack.training.output()[-3000:]}"
    assert states == [pb.Job.PENDING, pb.Job.RUNNING, pb.Job.SUCCEEDED]
    print(f"loss curve ({len(losses)} reports): {[round(x, 3) for x in losses]}")
    assert len(losses) == TINY["max_steps"] // TINY["log_every"]
    assert losses[-1] < losses[0] - 1.0  # nats per token; the first report averages the first 5 steps
    assert final.progress.step == TINY["max_steps"] and final.progress.tokens_per_second > 0
    assert 0 < final.metrics["eval_loss"] < losses[0] and final.metrics["perplexity"] > 1
    assert any("packed" in line for line in logs)

    model = client.model("tiny-topics:latest")
    assert final.model == model.ref == "tiny-topics:1"
    assert (model.lineage.job_id, model.lineage.tokenizer) == (job.job_id, "topics-bpe:1")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(model.files)
    folder = stack.home / "artifacts" / model.path
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert loaded.config.num_key_value_heads == 2 and loaded.num_parameters() == model.parameters
    with torch.no_grad():
        assert loaded(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 1000)
    assert [m.ref for m in client.models("tiny-topics")] == ["tiny-topics:1"]


def test_the_command_line_lists_shows_and_refuses(stack: Stack) -> None:
    runner = CliRunner()
    env = {"LLMP_TRAINING_ADDRESS": stack.training.address}
    listed = runner.invoke(cli_training.group, ["list", "--type", "pretrain"], env=env)
    assert listed.exit_code == 0, listed.output
    assert all(j.job_id in listed.output for j in stack.client.list_jobs(job_type="pretrain"))
    shown = runner.invoke(cli_training.group, ["model", "tiny-topics:latest"], env=env)
    assert shown.exit_code == 0 and '"ref": "tiny-topics:1"' in shown.output
    before = len(stack.client.list_jobs())
    refused = runner.invoke(
        cli_training.group, ["submit", "pretrain", "tokenizer=topics-bpe", "corpus=[topics]", "max_steps=-3"], env=env
    )
    assert refused.exit_code != 0 and "INVALID_ARGUMENT" in str(refused.exception)
    assert len(stack.client.list_jobs()) == before  # the refusal started nothing


def test_bad_input_is_refused_before_anything_starts(stack: Stack) -> None:
    client, before = stack.client, len(stack.client.list_jobs())
    cases = [
        ("pretrain", {**TINY, "tokenizer": "nope"}, grpc.StatusCode.NOT_FOUND, "config.tokenizer"),
        ("pretrain", {**TINY, "corpus": ["nope"]}, grpc.StatusCode.NOT_FOUND, "config.corpus[0]"),
        ("pretrain", {**TINY, "warmup_steps": 40}, grpc.StatusCode.INVALID_ARGUMENT, "config.warmup_steps"),
        (
            "pretrain",
            {**TINY, "hidden_size": 8192, "num_layers": 48},
            grpc.StatusCode.INVALID_ARGUMENT,
            "config.micro_batch_size",
        ),
        ("finetune", TINY, grpc.StatusCode.INVALID_ARGUMENT, "type"),
    ]
    for job_type, config, code, field in cases:
        error = refused(client.submit, job_type, config)
        assert (error.code(), error.details().split(":")[0]) == (code, field)
    assert len(client.list_jobs()) == before
    assert refused(client.get, "train-nope").code() == grpc.StatusCode.NOT_FOUND
    assert refused(client.model, "nope:1").code() == grpc.StatusCode.NOT_FOUND


PREPARE = {
    "tokenizer": "topics-bpe",
    "corpus": ["data/topic-files"],
    "seq_len": TINY["seq_len"],
    "stages": [
        {"type": "normalize"},
        {"type": "exact_dedup"},
        {"type": "near_dedup"},
        {"type": "quality", "min_chars": 200},
        {"type": "pii"},
    ],
}


@pytest.fixture(scope="module")
def prepared(stack: Stack) -> pb.Job:
    """A prepare job over a folder of pydoc's topics, one file each, with a copy, a near copy, a scrap and
    an e-mail address among them."""
    folder = stack.home / "artifacts" / "data" / "topic-files"
    folder.mkdir(parents=True)
    texts = list(dict.fromkeys(text for _, text in corpora.pydoc_topics() if len(text) > 300))[:60]
    texts += [texts[0], texts[1] + " again", "a scrap", texts[2] + "\nWrite to someone@example.com for help."]
    for i, text in enumerate(texts):
        (folder / f"{i:03}.txt").write_text(text)
    job = stack.client.submit("prepare", PREPARE)
    return stack.client.wait(job.job_id, timeout=WATCH_TIMEOUT_S)


def test_a_prepare_job_writes_a_data_set_that_training_jobs_take(stack: Stack, prepared: pb.Job) -> None:
    assert prepared.state == pb.Job.SUCCEEDED, prepared.reason
    assert prepared.dataset == f"datasets/{prepared.job_id}" and not prepared.model
    metrics = prepared.metrics
    assert metrics["read_docs_out"] == 64 and metrics["exact_dedup_docs_out"] == 63, dict(metrics)
    # the near copy goes (and any near pair among the topics), then the scrap
    assert metrics["near_dedup_docs_out"] <= 62 and metrics["quality_docs_out"] == metrics["near_dedup_docs_out"] - 1
    assert metrics["documents"] == metrics["quality_docs_out"] and metrics["sequences"] >= 2, dict(metrics)
    logs = [e.log for e in stack.client.watch(prepared.job_id, timeout=WATCH_TIMEOUT_S) if e.log]
    assert any(line.startswith("data near_dedup: ") for line in logs), logs
    assert f"data set {prepared.dataset}: {metrics['sequences']:.0f} sequences of {TINY['seq_len']}" in logs

    client, before = stack.client, len(stack.client.list_jobs())
    missing, invalid = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT
    from_data = {k: v for k, v in TINY.items() if k != "corpus"}
    cases = [
        ("pretrain", {**from_data, "dataset": "train-nope"}, missing, "no prepared data set"),
        ("pretrain", {**from_data, "dataset": prepared.job_id, "seq_len": 32}, invalid, "this job needs 32"),
        ("pretrain", {**TINY, "dataset": prepared.job_id}, invalid, "one of them"),
        ("prepare", {**PREPARE, "dataset": prepared.job_id}, invalid, "takes no prepared dataset"),
    ]
    for job_type, config, code, words in cases:
        error = refused(client.submit, job_type, config)
        assert error.code() == code and words in error.details(), error.details()
    assert len(client.list_jobs()) == before


def test_a_job_outlives_a_service_restart_then_cancel_keeps_its_last_checkpoint(stack: Stack, prepared: pb.Job) -> None:
    # It trains on the prepared data set: nothing is prepared again when it resumes.
    config = {k: v for k, v in TINY.items() if k != "corpus"} | {"dataset": prepared.job_id}
    config.update(max_steps=5000, checkpoint_every=5, warmup_steps=10, num_workers=1, model_name="tiny-restarted")
    job = stack.client.submit("pretrain", config)
    follow_until(stack.client, job.job_id, "checkpoint checkpoints/")
    stack.restart_training()

    again = stack.client.get(job.job_id)
    assert again.state in (pb.Job.PENDING, pb.Job.RUNNING), again.reason
    assert again.checkpoint.startswith(f"checkpoints/{job.job_id}/step-")
    follow_until(stack.client, job.job_id, "resumed from checkpoints/")
    assert stack.client.get(job.job_id).attempts == 2
    stack.client.cancel(job.job_id)
    final = stack.client.wait(job.job_id, timeout=WATCH_TIMEOUT_S)
    assert final.state == pb.Job.CANCELLED, final.reason
    assert final.checkpoint and final.checkpoint in final.reason
    assert (stack.home / "artifacts" / final.checkpoint / "model.safetensors").is_file()
    assert final.progress.step < 5000 and not final.model
    assert refused(stack.client.cancel, job.job_id).code() == grpc.StatusCode.FAILED_PRECONDITION
    logs = [e.log for e in stack.client.watch(job.job_id, timeout=WATCH_TIMEOUT_S) if e.log]
    assert not any(line.startswith("preparing data") for line in logs), logs
