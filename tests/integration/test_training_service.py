"""The training service as a real process: real Redis, the real tokeniser service, Ray Train, gRPC.

The session's training stack (tests/integration/training_stack.py): a byte-level BPE tokeniser on
`pydoc_data.topics` and tiny Llama models trained on that text by Ray Train workers.
"""

from __future__ import annotations

import grpc
import pytest
import torch
from click.testing import CliRunner
from llmp.training.v1 import training_pb2 as pb
from transformers import AutoModelForCausalLM

from libs.common.cli import training as cli_training
from tests.integration.training_stack import TINY, WATCH_TIMEOUT_S, Stack, follow_until, refused

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


def test_a_job_outlives_a_service_restart_then_cancel_keeps_its_last_checkpoint(stack: Stack) -> None:
    config = {**TINY, "max_steps": 5000, "checkpoint_every": 5, "warmup_steps": 10, "num_workers": 1}
    config["model_name"] = "tiny-restarted"
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
