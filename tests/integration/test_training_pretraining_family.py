"""Masked-LM pretraining, distillation of a draft model and a scaling sweep, through the real service.

Real Redis, the real tokeniser service, the training service over gRPC and Ray Train workers: the
session's training stack (tests/helpers/training_stack.py). Two tokenisers on
`pydoc_data.topics`: the byte-level BPE of the causal models and a WordPiece with [CLS]/[SEP]/[MASK]
for the masked LM. The draft is distilled from the stack's shared base. The models are tiny and
train for a few dozen steps.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest
import torch
from click.testing import CliRunner
from llmp.training.v1 import training_pb2 as pb
from transformers import AutoModelForMaskedLM

from libs.common.artifacts import ArtifactStore
from libs.common.cli import plan as cli_plan
from libs.common.planning.scaling import SweepFit
from services.inference.engine import EngineConfig, KVCacheConfig, LLMEngine, SamplingParams
from services.inference.engine.drafters import DraftModelDrafter
from services.inference.engine.model_loader import load_model
from tests.helpers.training_stack import TINY, WATCH_TIMEOUT_S, Stack, follow_until, refused, run_to_end

pytestmark = pytest.mark.integration

MLM = {
    "tokenizer": "topics-wp",
    "corpus": ["topics"],
    "model_name": "fam-bert",
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "seq_len": 64,
    "micro_batch_size": 8,
    "max_steps": 30,
    "learning_rate": 0.002,
    "warmup_steps": 3,
    "log_every": 5,
    "checkpoint_every": 30,
    "num_workers": 2,
}
DISTILL = {
    "target": "base:latest",
    "model_name": "fam-draft",
    "hidden_size": 32,
    "num_layers": 1,
    "num_heads": 2,
    "num_kv_heads": 1,
    "seq_len": 64,
    "micro_batch_size": 8,
    "max_steps": 30,
    "learning_rate": 0.003,
    "warmup_steps": 3,
    "log_every": 5,
    "checkpoint_every": 30,
    "num_workers": 1,
    "temperature": 2.0,
    "hard_label_weight": 0.2,
}
SWEEP: dict[str, Any] = {
    "tokenizer": "topics-bpe",
    "corpus": ["topics"],
    "sizes": [
        {"hidden_size": 8, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1},
        {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1},
        {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1},
    ],
    "tokens_per_param": 1.0,
    "seq_len": 64,
    "micro_batch_size": 16,
    "learning_rate": 0.005,
    "warmup_steps": 3,
    "log_every": 5,
    "checkpoint_every": 1000,
    "num_workers": 1,
}


def test_bad_input_is_refused_at_submission(stack: Stack) -> None:
    client, before = stack.client, len(stack.client.list_jobs())
    cases = [
        ("mlm", {**MLM, "tokenizer": "topics-bpe"}, grpc.StatusCode.INVALID_ARGUMENT, "config.mask_token"),
        ("mlm", {**MLM, "mask_probability": 1.5}, grpc.StatusCode.INVALID_ARGUMENT, "config.mask_probability"),
        ("mlm", {**MLM, "mask_token": "[NOPE]"}, grpc.StatusCode.INVALID_ARGUMENT, "config.mask_token"),
        ("distill", {**DISTILL, "target": "nope:1"}, grpc.StatusCode.NOT_FOUND, "config.target"),
        ("distill", {**DISTILL, "temperature": 0}, grpc.StatusCode.INVALID_ARGUMENT, "config.temperature"),
        ("sweep", {**SWEEP, "sizes": SWEEP["sizes"][:2]}, grpc.StatusCode.INVALID_ARGUMENT, "config.sizes"),
        ("sweep", {**SWEEP, "flops_budget": 1e9}, grpc.StatusCode.INVALID_ARGUMENT, "config.flops_budget"),
        (
            "sweep",
            {**SWEEP, "sizes": [*SWEEP["sizes"][:2], {"hidden_size": 30, "num_heads": 4}]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "config.sizes[2].hidden_size",
        ),
    ]
    for job_type, config, code, field in cases:
        error = refused(client.submit, job_type, config)
        assert (error.code(), error.details().split(":")[0]) == (code, field), error.details()
    assert "[MASK]" in refused(client.submit, "mlm", {**MLM, "tokenizer": "topics-bpe"}).details()
    assert len(client.list_jobs()) == before


def test_masked_lm_trains_on_two_workers_and_registers_an_encoder(stack: Stack) -> None:
    final, progress = run_to_end(stack, "mlm", MLM)
    losses = [p.loss for p in progress]
    assert losses[-1] < losses[0] - 0.5  # nats per masked token
    assert final.metrics["eval_loss"] < losses[0] and 0 < final.metrics["eval_accuracy"] <= 1
    model = stack.client.model(final.model)
    assert model.lineage.tokenizer == "topics-wp:1"
    loaded = AutoModelForMaskedLM.from_pretrained(stack.home / "artifacts" / model.path)
    with torch.no_grad():
        assert loaded(torch.tensor([[2, 10, 4, 11, 3]])).logits.shape == (1, 5, loaded.config.vocab_size)


def test_a_distilled_draft_follows_its_target_and_drafts_for_it(stack: Stack) -> None:
    target = stack.base()
    error = refused(stack.client.submit, "distill", {**DISTILL, "tokenizer": "topics-wp"})
    assert (error.code(), error.details().split(":")[0]) == (grpc.StatusCode.INVALID_ARGUMENT, "config.tokenizer")

    final, progress = run_to_end(stack, "distill", DISTILL)
    losses = [p.loss for p in progress]
    assert losses[-1] < losses[0] * 0.9
    assert final.config["target"] == target.model == "base:1"
    assert list(final.config["corpus"]) == ["topics"] and final.config["tokenizer"] == "topics-bpe:1"
    metrics = final.metrics
    assert 0 < metrics["top1_agreement"] <= 1 and metrics["eval_kl"] > 0
    draft = stack.client.model(final.model)
    assert draft.lineage.parent == "base:1" and draft.metrics["top1_agreement"] == metrics["top1_agreement"]

    store = ArtifactStore(stack.home / "artifacts")
    target_path = stack.client.model(target.model).path
    config = EngineConfig(KVCacheConfig(block_size=4, num_blocks=256))
    drafter = DraftModelDrafter(draft.path, num_tokens=3, kv_cache={"block_size": 4, "num_blocks": 256}, store=store)
    speculative = LLMEngine(load_model(target_path, store), config, drafter=drafter)
    plain = LLMEngine(load_model(target_path, store), config)
    prompts = [[5, 17, 40, 3, 9], [100, 200, 300]]
    greedy = SamplingParams(max_tokens=12, temperature=0)
    drafted = speculative.generate(prompts, greedy)
    assert [o.outputs[0].token_ids for o in drafted] == [
        o.outputs[0].token_ids for o in plain.generate(prompts, greedy)
    ]
    accepted = sum(o.outputs[0].num_accepted_tokens for o in drafted)
    proposed = sum(o.outputs[0].num_draft_tokens for o in drafted)
    print(f"draft acceptance at temperature 0: {accepted}/{proposed}")
    assert proposed > 0


def test_a_sweep_fits_a_power_law_to_a_ladder_and_the_planner_reads_it(stack: Stack) -> None:
    final, progress = run_to_end(stack, "sweep", SWEEP)
    losses = [p.loss for p in progress]
    assert losses[-1] < losses[0]
    metrics = final.metrics
    ladder = [metrics[f"model{i}_eval_loss"] for i in range(3)]
    assert ladder[2] < ladder[0]  # the largest model, trained longest, ends lowest
    assert metrics["model0_params"] < metrics["model1_params"] < metrics["model2_params"]
    fit = SweepFit.from_json((stack.home / "artifacts" / "sweeps" / final.job_id / "fit.json").read_text())
    assert fit.losses == ladder and fit.size_law.alpha == metrics["fit_alpha"]
    assert fit.size_law.alpha > 0 and fit.size_law.A > 0  # loss falls with size under the fitted law
    printed = CliRunner().invoke(
        cli_plan.group, ["compute", "--flops", "1e18", "--fit", final.job_id], env={"LLMP_HOME": str(stack.home)}
    )
    assert printed.exit_code == 0, printed.output
    assert "sweep L(N)" in printed.output and "Chinchilla fitted law" in printed.output


@pytest.mark.gpu
def test_pretraining_shards_over_gpu_workers_with_fsdp_and_resumes(stack: Stack) -> None:
    """FSDP over every GPU (at least two), bf16 where the GPU has it; cancelled after a checkpoint, then resumed."""
    gpus = torch.cuda.device_count()
    if gpus < 2:
        pytest.skip(f"FSDP needs at least 2 GPUs; this machine has {gpus}")
    config = {**TINY, "model_name": "fam-fsdp", "use_gpu": True, "fsdp": True, "num_workers": gpus}
    config.update(max_steps=40, checkpoint_every=10)
    job = stack.client.submit("pretrain", config)
    follow_until(stack.client, job.job_id, "checkpoint checkpoints/")
    stack.client.cancel(job.job_id)
    assert stack.client.wait(job.job_id, timeout=WATCH_TIMEOUT_S).state == pb.Job.CANCELLED
    stack.client.resume(job.job_id)
    final = stack.client.wait(job.job_id, timeout=WATCH_TIMEOUT_S)
    assert final.state == pb.Job.SUCCEEDED and final.metrics["steps"] == 40, final.reason
    assert final.metrics["eval_loss"] < 6.0  # from ln(1000) = 6.9 for a uniform guess over the vocabulary
    folder = ArtifactStore(stack.home / "artifacts").path(stack.client.model(final.model).path)
    assert (folder / "model.safetensors").is_file()
