"""The training service as a real process: real Redis, the real tokeniser service, Ray Train, gRPC.

One tokeniser (byte-level BPE on `pydoc_data.topics`) and one training service are shared by the
module; the jobs are tiny Llama models trained on that text by two Ray Train workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from click.testing import CliRunner
from llmp.training.v1 import training_pb2 as pb
from transformers import AutoModelForCausalLM

from libs.common import corpora
from libs.common.cli import training as cli_training
from libs.common.clients.tokenizer import TokenizerClient
from libs.common.clients.training import TrainingClient
from tests.conftest import ServiceProcess, start_service
from tests.unit.training.redis_server import RedisServer

pytestmark = pytest.mark.integration

WATCH_TIMEOUT_S = 400  # a watch that outlives this fails the test instead of hanging it

TINY = {
    "tokenizer": "topics-bpe",
    "corpus": ["topics"],
    "model_name": "tiny-topics",
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "seq_len": 64,
    "micro_batch_size": 8,
    "grad_accum_steps": 2,
    "max_steps": 40,
    "learning_rate": 0.003,
    "warmup_steps": 5,
    "log_every": 5,
    "checkpoint_every": 20,
    "num_workers": 2,
}


class Stack:
    """Redis, the tokeniser service and the training service, sharing one LLMP_HOME.

    `training_env` is added to the training service's environment (e.g. more Ray CPUs).
    """

    def __init__(self, home: Path, training_env: dict[str, str] | None = None) -> None:
        self.home = home
        self.training_env = training_env or {}
        self.redis = RedisServer(home / "redis")
        (home / "redis").mkdir()
        self.redis.start()
        self.tokenizer = start_service("tokenizer", home)
        tokenizers = TokenizerClient(self.tokenizer.address)
        tokenizers.upload("topics", [text for _, text in corpora.pydoc_topics()])
        trained = tokenizers.train("topics-bpe", "byte_level_bpe", 1000, corpus=["topics"])
        assert trained.state == trained.SUCCEEDED, trained.error
        self.training = self._start_training()
        self.client = TrainingClient(self.training.address)

    def _start_training(self) -> ServiceProcess:
        env = {
            "LLMP_REDIS_URL": self.redis.url,
            "LLMP_TOKENIZER_ADDRESS": self.tokenizer.address,
            "LLMP_TRAINING_RAY_NUM_CPUS": "2",
            "LLMP_TRAINING_RAY_DASHBOARD": "false",
            "LLMP_TRAINING_DRAIN_SECONDS": "20",
            "RAY_gcs_server_port_wait_time_s": "180",  # a loaded 2-core machine starts Ray slowly
            **self.training_env,
        }
        return start_service("training", self.home, extra_env=env)

    def restart_training(self) -> None:
        assert self.training.stop() == 0, self.training.output()
        self.training = self._start_training()
        self.client = TrainingClient(self.training.address)

    def close(self) -> None:
        self.training.stop()
        self.tokenizer.stop()
        self.redis.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("llmp"))
    yield stack
    stack.close()


def refused(call, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call(*args)
    return e.value


def follow_until(client: TrainingClient, job_id: str, seen: str) -> pb.Job:
    """Read the job's events until a log line containing `seen`; returns the job at that point."""
    events = client.stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=WATCH_TIMEOUT_S)
    for event in events:
        assert event.job.state in (pb.Job.PENDING, pb.Job.RUNNING), event.job.reason
        if seen in event.log:
            events.cancel()
            return event.job
    raise AssertionError(f"the job ended before logging {seen!r}")


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
    assert [m.ref for m in client.models("tiny")] == ["tiny-topics:1"]


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
    config = {**TINY, "max_steps": 5000, "checkpoint_every": 5, "warmup_steps": 10, "model_name": "tiny-restarted"}
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
