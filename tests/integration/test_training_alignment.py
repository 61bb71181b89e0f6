"""SFT (full and LoRA), a reward model, DPO, GRPO, RLOO and PPO through the real training service.

Real Redis, the real tokeniser service, the training service over gRPC and trl trainers (PPO: our
loop) on Ray Train workers: the session's training stack (tests/helpers/training_stack.py). Its
base, a tiny Llama pretrained on `pydoc_data.topics`, is fine-tuned on "pydoc:instructions" (a
paragraph's first sentence -> the rest); the reward model, DPO and the RL jobs use
"code:preferences" (a function's real body over one with a single corruption, its docstring over
another function's). Every metric is measured on the held-out modules and topics
(jobs/builtin_data.py), which no job trains on, and every job is seeded, so the figures asserted
are the same on every run of the same code. (The pydoc pairs, whose rejected answer continues
another topic, are beyond a model this small: its reward model stays at chance on held-out topics.)
"""

from __future__ import annotations

import json
import signal
from typing import Any

import grpc
import pytest
import torch
from llmp.training.v1 import training_pb2 as pb
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from libs.common.artifacts import ArtifactStore
from tests.helpers.training_stack import (
    GPU,
    WATCH_TIMEOUT_S,
    Stack,
    follow_until,
    refused,
    run_to_end,
    train_workers,
)

pytestmark = pytest.mark.integration

COMMON: dict[str, Any] = {
    "base": "base:latest",
    "max_length": 128,
    "max_records": 240,
    "max_eval_records": 24,
    "micro_batch_size": 8,
    "warmup_steps": 2,
    "log_every": 5,
    "checkpoint_every": 100,
}
LORA = {"lora_rank": 8, "lora_alpha": 16.0, "learning_rate": 1e-2, "max_steps": 20}
SFT = {**COMMON, "data": ["pydoc:instructions"], "model_name": "al-sft", "max_steps": 30, "learning_rate": 2e-3}
PAIRS = {"data": ["code:preferences"], "max_records": 0, "max_eval_records": 64}
"""Corrupted function bodies and other functions' docstrings: pairs a model this small can learn to rank on
modules it never saw (the pydoc pairs' wrong-topic continuations are beyond it; see the module docstring)."""
REWARD = {**COMMON, **PAIRS, "model_name": "al-rm", "max_steps": 150, "learning_rate": 1e-3}
DPO = {
    **COMMON,
    **PAIRS,
    "base": "al-sft:latest",
    "model_name": "al-dpo",
    "max_steps": 20,
    "learning_rate": 1e-3,
    "beta": 0.1,
}
GRPO = {
    **COMMON,
    "base": "al-sft:latest",
    "reward_model": "al-rm:latest",
    "model_name": "al-grpo",
    "data": ["code:preferences"],
    "learning_rate": 2e-3,
    "warmup_steps": 1,
    "max_steps": 12,
    "micro_batch_size": 16,
    "num_generations": 4,
    "max_completion_length": 16,
    "max_eval_records": 16,
    "log_every": 2,
}


RL = {
    **COMMON,
    "base": "al-sft:latest",
    "reward_model": "al-rm:latest",
    "data": ["code:preferences"],
    "max_completion_length": 16,
    "max_eval_records": 16,
    "log_every": 2,
}
RLOO = {**GRPO, "model_name": "al-rloo"}
PPO = {
    **RL,
    "model_name": "al-ppo",
    "max_steps": 12,
    "micro_batch_size": 8,
    "grad_accum_steps": 2,
    "learning_rate": 5e-4,
    "warmup_steps": 1,
    "kl_coef": 0.05,
    "ppo_epochs": 4,
    "checkpoint_every": 4,
}
KL_BOUND = 1.0
"""Nats per token from the SFT model, after training: far beyond what a KL-penalised policy drifts in a few steps."""


@pytest.fixture(scope="module")
def base(stack: Stack) -> pb.Job:
    return stack.base()


@pytest.fixture(scope="module")
def sft(stack: Stack, base: pb.Job) -> pb.Job:
    return run_to_end(stack, "sft", SFT)[0]


@pytest.fixture(scope="module")
def reward(stack: Stack, base: pb.Job) -> pb.Job:
    return run_to_end(stack, "reward", REWARD)[0]


def folder(stack: Stack, ref: str):
    return ArtifactStore(stack.home / "artifacts").path(stack.client.model(ref).path)


def test_bad_input_is_refused_at_submission(stack: Stack, base: pb.Job) -> None:
    artifacts = ArtifactStore(stack.home / "artifacts")
    bad = artifacts.path("data/bad.jsonl")
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    chat = artifacts.path("data/chat.jsonl")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]
    chat.write_text(json.dumps({"messages": messages}))
    invalid, missing = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    cases = [
        ("sft", {**SFT, "base": "nope:1"}, missing, "config.base"),
        ("sft", {**SFT, "data": ["nope.jsonl"]}, missing, "config.data[0]"),
        ("sft", {**SFT, "data": ["data/bad.jsonl"]}, invalid, "config.data[0]"),
        ("sft", {**SFT, "data": ["data/chat.jsonl"]}, invalid, "config.data"),
        ("sft", {**SFT, "data": ["pydoc:preferences"]}, invalid, "config.data[0]"),
        ("sft", {**SFT, "max_length": 4096}, invalid, "config.max_length"),
        ("sft", {**SFT, "lora_rank": -1}, invalid, "config.lora_rank"),
        ("sft", {**SFT, "lora_rank": 8, "quantize": "nf4"}, invalid, "config.quantize"),
        *([] if GPU else [("sft", {**SFT, "use_gpu": True}, invalid, "config.use_gpu")]),
        ("sft", {**SFT, "micro_batch_size": 65536}, invalid, "config.micro_batch_size"),
        ("dpo", {**DPO, "base": "base:latest", "beta": 0}, invalid, "config.beta"),
        ("grpo", {**GRPO, "base": "base:latest", "reward_model": "base:latest"}, invalid, "config.reward_model"),
        ("grpo", {**GRPO, "base": "base:latest", "reward_model": "nope"}, missing, "config.reward_model"),
    ]
    before = len(stack.client.list_jobs())
    for job_type, config, code, field in cases:
        error = refused(stack.client.submit, job_type, config)
        assert (error.code(), error.details().split(":")[0]) == (code, field), error.details()
    assert "data/bad.jsonl:2" in refused(stack.client.submit, "sft", {**SFT, "data": ["data/bad.jsonl"]}).details()
    assert "chat template" in refused(stack.client.submit, "sft", {**SFT, "data": ["data/chat.jsonl"]}).details()
    assert len(stack.client.list_jobs()) == before


def test_sft_learns_the_completions(stack: Stack, sft: pb.Job) -> None:
    metrics = sft.metrics
    assert metrics["eval_loss"] < metrics["eval_loss_before"] - 0.25, dict(metrics)
    model = stack.client.model(sft.model)
    assert model.lineage.parent == "base:1" and "pydoc:instructions" in model.lineage.datasets
    loaded = AutoModelForCausalLM.from_pretrained(folder(stack, sft.model))
    assert loaded.config.architectures == ["LlamaForCausalLM"]


def logits(path, ids: torch.Tensor, adapter=None) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model(ids).logits


def test_a_cancelled_then_killed_lora_job_resumes_from_its_checkpoints(stack: Stack, base: pb.Job) -> None:
    # A LoRA job that registers its adapter alone (GRPO below merges one into its model). It is cancelled
    # after its first checkpoint and resumed; then its Ray Train worker is killed after the next one.
    every = 4
    config = {**SFT, **LORA, "model_name": "al-adapter", "merge_adapter": False, "max_steps": 24}
    config.update(checkpoint_every=every, keep_checkpoints=1)
    job = stack.client.submit("sft", config)
    follow_until(stack.client, job.job_id, "checkpoint checkpoints/")
    stack.client.cancel(job.job_id)
    cancelled = stack.client.wait(job.job_id, timeout=WATCH_TIMEOUT_S)
    assert cancelled.state == pb.Job.CANCELLED and not cancelled.model, cancelled.reason
    assert f"checkpoints/{job.job_id}/hf/checkpoint-" in cancelled.checkpoint
    stopped_at = int(cancelled.checkpoint.rsplit("-", 1)[1])
    assert every <= stopped_at < 16, stopped_at  # room for a checkpoint after the resume, then a kill
    assert (stack.home / "artifacts" / cancelled.checkpoint / "trainer_state.json").is_file()

    stack.client.resume(job.job_id)
    at_kill = follow_until(stack.client, job.job_id, "checkpoint checkpoints/", after="resumed from")
    # the newest worker: an earlier job's may still be on its way out
    worker = max(train_workers(stack.training.proc.pid), key=lambda proc: proc.create_time())
    worker.send_signal(signal.SIGKILL)

    final = stack.client.wait(job.job_id, timeout=WATCH_TIMEOUT_S)
    assert final.state == pb.Job.SUCCEEDED and final.progress.step == 24, final.reason
    logs = [e.log for e in stack.client.watch(job.job_id, timeout=WATCH_TIMEOUT_S) if e.log]
    resumed = [line for line in logs if line.startswith(f"resumed from checkpoints/{job.job_id}/hf/checkpoint-")]
    assert resumed[0] == f"resumed from {cancelled.checkpoint}" and len(resumed) == 2, logs
    step = int(resumed[1].rsplit("-", 1)[1])
    # the newest checkpoint the trainer completed before the kill: at most one interval is lost
    assert step % every == 0 and stopped_at < step and step >= at_kill.progress.step - every, (step, at_kill.progress)
    assert final.metrics["steps"] == 24 and final.metrics["eval_loss"] < final.metrics["eval_loss_before"]
    files = set(stack.client.model(final.model).files)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    ids = torch.tensor([list(range(5, 40))])
    on_base = logits(folder(stack, "base:latest"), ids, adapter=folder(stack, final.model))
    assert not torch.allclose(on_base, logits(folder(stack, "base:latest"), ids), atol=1e-3)


def test_reward_model_ranks_held_out_pairs(stack: Stack, reward: pb.Job) -> None:
    metrics = reward.metrics
    # 64 held-out pairs from modules no job trains on: 0.65 is above a coin toss (p < 0.01), where an
    # untrained head starts (its scores are seeded, so the figure is the same on every run).
    assert metrics["eval_accuracy"] >= 0.65 and metrics["eval_accuracy_before"] < 0.6, dict(metrics)
    assert metrics["eval_margin"] > metrics["eval_margin_before"]
    assert metrics["eval_loss"] < metrics["eval_loss_before"]  # the Bradley-Terry loss on held-out pairs
    model = AutoModelForSequenceClassification.from_pretrained(folder(stack, reward.model))
    assert model.config.num_labels == 1 and model.config.architectures == ["LlamaForSequenceClassification"]


def test_dpo_reports_the_implicit_reward_on_held_out_pairs(stack: Stack, sft: pb.Job) -> None:
    final, _ = run_to_end(stack, "dpo", DPO)
    metrics = final.metrics
    # At step 0 the policy is its reference: the implicit rewards are 0 up to rounding, a coin toss.
    assert metrics["eval_reward_accuracy_before"] <= 0.6 and abs(metrics["eval_reward_margin_before"]) < 0.01
    # After it, the policy has moved from its reference on pairs it never saw (whether it ranks them better
    # than chance is printed: a model this small does not, in so few steps; the reward model above does).
    assert abs(metrics["eval_reward_margin"]) > 0 and metrics["eval_logp_chosen"] != metrics["eval_logp_chosen_before"]
    print(f"dpo held-out implicit-reward accuracy {metrics['eval_reward_accuracy']:.3f}")
    assert stack.client.model(final.model).lineage.parent == "al-sft:1"


def assert_rl_result(stack: Stack, sft: pb.Job, final: pb.Job, progress: list[pb.Progress]) -> None:
    """What every RL job must show: a higher held-out reward than the SFT model's, at a bounded KL from it."""
    metrics = final.metrics
    assert metrics["eval_kl_before"] == 0 and 0 < metrics["eval_kl"] < KL_BOUND, dict(metrics)
    assert metrics["eval_reward"] > metrics["eval_reward_before"], dict(metrics)
    assert all("reward" in p.values and "kl" in p.values for p in progress), progress[0]
    model = stack.client.model(final.model)
    assert model.lineage.parent == "al-sft:1" and "al-rm:1" in model.lineage.datasets  # pinned at submission
    assert "model.safetensors" in model.files and "adapter_config.json" not in model.files
    ids = torch.tensor([list(range(5, 40))])
    assert not torch.allclose(logits(folder(stack, final.model), ids), logits(folder(stack, sft.model), ids))


@pytest.mark.parametrize(("job_type", "config"), [("grpo", GRPO), ("rloo", RLOO)])
def test_grpo_and_rloo_raise_the_held_out_reward_at_a_bounded_kl(
    stack: Stack, sft: pb.Job, reward: pb.Job, job_type: str, config: dict[str, Any]
) -> None:
    final, progress = run_to_end(stack, job_type, config)
    assert_rl_result(stack, sft, final, progress)


def test_ppo_raises_the_held_out_reward_at_a_bounded_kl_and_resumes(stack: Stack, sft: pb.Job, reward: pb.Job) -> None:
    job = stack.client.submit("ppo", PPO)
    follow_until(stack.client, job.job_id, "checkpoint checkpoints/")
    stack.client.cancel(job.job_id)
    cancelled = stack.client.wait(job.job_id, timeout=WATCH_TIMEOUT_S)
    assert cancelled.state == pb.Job.CANCELLED and not cancelled.model, cancelled.reason
    stopped_at = int(cancelled.checkpoint.rsplit("-", 1)[1])
    assert PPO["checkpoint_every"] <= stopped_at < PPO["max_steps"], stopped_at

    stack.client.resume(job.job_id)
    final = stack.client.wait(job.job_id, timeout=WATCH_TIMEOUT_S)
    assert final.state == pb.Job.SUCCEEDED and final.progress.step == PPO["max_steps"], final.reason
    events = list(stack.client.watch(job.job_id, timeout=WATCH_TIMEOUT_S))
    logs = [e.log for e in events if e.log]
    assert f"resumed from {cancelled.checkpoint} at step {stopped_at}" in logs, logs
    progress = [e.progress for e in events if e.HasField("progress")]
    print(f"ppo progress: {[dict(p.values) for p in progress]}; metrics {dict(final.metrics)}")
    assert_rl_result(stack, sft, final, progress)
    values = progress[-1].values
    assert 0 < values["rollout_share"] < 1 and values["kl_coef"] == PPO["kl_coef"]  # a fixed coefficient
    assert final.metrics["steps"] == PPO["max_steps"]


@pytest.mark.gpu
def test_qlora_trains_an_adapter_on_a_4_bit_base(stack: Stack, base: pb.Job) -> None:
    config = {**SFT, "model_name": "al-qlora", "lora_rank": 8, "quantize": "nf4", "use_gpu": True, "max_steps": 10}
    final, _ = run_to_end(stack, "sft", config)
    assert final.metrics["eval_loss"] < final.metrics["eval_loss_before"]
