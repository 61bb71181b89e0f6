"""PPO's rollouts and updates, and the body each Ray Train worker of a `ppo` job runs.

One step of the job, on every worker:

1. rollout: `micro_batch_size * grad_accum_steps` prompts (the step's share of a seeded stream) are
   left-padded and completed by sampling from the policy (`max_completion_length` tokens at most,
   at `temperature`); the policy's log-probabilities and values, the frozen reference's
   log-probabilities and the reward model's score of prompt + completion are computed once, with
   no gradient;
2. rewards and advantages: the per-token KL penalty to the reference, the score on the last token
   (normalised by the mean and spread of the first batch's scores, as Ziegler et al. normalise the
   reward model, so `kl_coef` and the value loss do not depend on its scale), GAE over the value
   head's estimates, advantages whitened (jobs/ppo_loss.py);
3. update: `ppo_epochs` passes over the rollout in shuffled minibatches of `micro_batch_size`, each
   an optimiser step on the clipped surrogate plus `vf_coef` times the clipped value loss
   (gradients all-reduced across workers by DDP);
4. the KL coefficient follows the batch's KL when `kl_target` is set (AdaptiveKL).

The model trained is `PolicyWithValue`: the causal LM and a scalar value head on its last hidden
state (a shared trunk, as in Ziegler et al.). The KL coefficient and the score normalisation are
buffers of it, so a checkpoint (checkpoints.save: weights, optimiser, schedule, step) carries them, and a
resumed run samples the same prompts and tokens (the stream and the sampling are seeded by step).

Progress reports carry, besides the loss and tokens/s, the batch's mean reward, KL (nats per
completion), the coefficient, the clip fraction, and the share of the step's time spent generating
the rollout (`rollout_share`) against training on it. Held-out metrics (`eval_reward`, `eval_kl` in
nats per token, `eval_kl_per_completion`, `eval_length`) are measured on the held-out prompts, with
the same seed, before the first step and after the last; the finished policy alone is saved as a
Hugging Face folder.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    get_cosine_with_min_lr_schedule_with_warmup,
)

from services.training import checkpoints
from services.training.checkpoints import TrainState
from services.training.jobs.hf_loop import HFLoop, read_jsonl
from services.training.jobs.lm_loop import build_optimizer, mixed_precision, unwrap
from services.training.jobs.ppo_loss import (
    AdaptiveKL,
    gae,
    kl_per_token,
    policy_loss,
    token_rewards,
    value_loss,
    whiten,
)
from services.training.jobs.workers import WorkerRun
from services.training.jobstore import JobStore

EVAL_SEED_OFFSET = 1_000_003
"""Held-out completions are sampled with seed + this, the same before and after training."""


@dataclass(kw_only=True)
class PPOParams:
    """PPO's own settings (the job's config adds them to the alignment settings)."""

    kl_coef: float = 0.05
    """Weight of the per-token KL penalty to the reference (the starting value when adaptive)."""
    kl_target: float = 0.0
    """0: a fixed kl_coef; > 0: the coefficient adapts so the KL per completion (nats) nears this."""
    kl_horizon: int = 10000
    """Completions over which the adaptive coefficient may move by about 20%."""
    gamma: float = 1.0
    """Discount per token."""
    lam: float = 0.95
    """GAE's lambda: 0 uses the value head's estimate after one token, 1 the whole return."""
    clip_range: float = 0.2
    """The policy's probability ratio is clipped to [1 - clip_range, 1 + clip_range]."""
    value_clip_range: float = 0.2
    """The value head's move from the rollout's values is clipped to this."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    ppo_epochs: int = 4
    """Passes over each rollout batch."""
    max_completion_length: int = 32
    """Tokens sampled per completion at most."""
    temperature: float = 1.0


@dataclass
class Models:
    """What PPO's workers load: folders in the artifact store, and how long a prompt may be."""

    policy: str
    """The SFT model the policy starts from; also the frozen reference."""
    reward: str
    """The reward model (a *ForSequenceClassification with one label)."""
    max_prompt_length: int


class PolicyWithValue(torch.nn.Module):
    """A causal LM with a scalar value head on its last hidden state; the KL coefficient rides along as a buffer."""

    kl_coef: torch.Tensor
    score_norm: torch.Tensor

    def __init__(self, policy: PreTrainedModel, kl_coef: float) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = torch.nn.Linear(policy.config.hidden_size, 1)
        torch.nn.init.zeros_(self.value_head.weight)  # starts at V = bias = 0: no untrained guess in the advantages
        torch.nn.init.zeros_(self.value_head.bias)
        self.register_buffer("kl_coef", torch.tensor(kl_coef, dtype=torch.float64))
        self.register_buffer("score_norm", torch.tensor([0.0, 0.0], dtype=torch.float64))  # mean, std; 0: unset

    def normalise(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores in units of the starting policy's spread, so the penalty and the value loss mean the same
        whatever the reward model's scale (mean and std set from the first batch: `calibrate`)."""
        mean, std = self.score_norm.tolist()
        return (scores - mean) / std

    def calibrate(self, scores: torch.Tensor) -> None:
        """Set the normalisation from the first batch's scores (gathered over workers) once."""
        if self.score_norm[1] > 0:
            return
        moments = torch.tensor(
            [scores.sum(), (scores.double() ** 2).sum(), len(scores)], dtype=torch.float64, device=scores.device
        )
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(moments)
        mean = moments[0] / moments[2]
        std = (moments[1] / moments[2] - mean**2).clamp(min=0).sqrt()
        self.score_norm.copy_(torch.stack([mean, std.clamp(min=1e-6)]).to(self.score_norm.device))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, L, V), values (B, L)) of every position."""
        out = self.policy(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, output_hidden_states=True
        )
        return out.logits, self.value_head(out.hidden_states[-1]).squeeze(-1).float()


@dataclass
class Rollout:
    """One batch of completions and what the update needs of them. B rows, P prompt and T completion tokens."""

    sequences: torch.Tensor  # (B, P + T) prompt (left-padded) + completion
    attention_mask: torch.Tensor  # (B, P + T)
    mask: torch.Tensor  # (B, T) 1 on generated tokens, up to and including the end-of-sequence token
    logprobs: torch.Tensor  # (B, T) of the sampled tokens under the policy that sampled them
    ref_logprobs: torch.Tensor  # (B, T) under the reference
    values: torch.Tensor  # (B, T)
    scores: torch.Tensor  # (B,) the reward model's
    prompt_length: int

    @property
    def completions(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length :]

    @property
    def position_ids(self) -> torch.Tensor:
        return positions(self.attention_mask)

    def kl(self) -> torch.Tensor:
        """(B,) the KL estimate of each completion (nats)."""
        return kl_per_token(self.logprobs, self.ref_logprobs, self.mask).sum(dim=1)


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding, as `generate` gives them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts, cut from the left to max_length (the end of a prompt is what the answer follows)."""
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    encoded = tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def completion_mask(completions: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, T) 1 up to and including the first end-of-sequence token, 0 after it."""
    is_eos = (completions == eos_id).long()
    after_eos = (is_eos.cumsum(dim=1) - is_eos) > 0
    return (~after_eos).float()


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(token) under logits / temperature (the distribution sampled from). (B, T)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def completion_outputs(
    model: torch.nn.Module, rollout: Rollout, rows: torch.Tensor | slice, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probabilities, values) of the completion tokens of some rows, each (b, T)."""
    p = rollout.prompt_length
    logits, values = model(rollout.sequences[rows], rollout.attention_mask[rows], rollout.position_ids[rows])
    return token_logprobs(logits[:, p - 1 : -1], rollout.completions[rows], temperature), values[:, p - 1 : -1]


def reference_logprobs(reference: PreTrainedModel, rollout: Rollout, temperature: float) -> torch.Tensor:
    p = rollout.prompt_length
    logits = reference(
        input_ids=rollout.sequences, attention_mask=rollout.attention_mask, position_ids=rollout.position_ids
    ).logits
    return token_logprobs(logits[:, p - 1 : -1], rollout.completions, temperature)


def scores(reward: PreTrainedModel, rollout: Rollout, eos_id: int) -> torch.Tensor:
    """(B,) the reward model's score of each prompt + completion, read at its last token that is not the
    end-of-sequence token (where a sequence-classification model pools, its pad being that token)."""
    n = rollout.mask.sum(dim=1).long()  # (B,) generated tokens, the end token included
    rows = torch.arange(len(n))
    ended = (n > 0) & (rollout.completions[rows, (n - 1).clamp(min=0)] == eos_id)
    last = rollout.prompt_length - 1 + n - ended.long()  # (B,) index into the sequence
    trunk = reward.base_model(
        input_ids=rollout.sequences, attention_mask=rollout.attention_mask, position_ids=rollout.position_ids
    ).last_hidden_state
    head: Any = reward.score  # type: ignore[union-attr]
    return head(trunk[rows, last]).squeeze(-1).float()


@torch.no_grad()
def rollout(
    model: torch.nn.Module,
    reference: PreTrainedModel,
    reward: PreTrainedModel,
    prompts: dict[str, torch.Tensor],
    params: PPOParams,
    eos_id: int,
    pad_id: int,
) -> Rollout:
    """Sample completions of the prompts and measure them (see the module docstring, step 1)."""
    policy: Any = unwrap(model).policy
    device = prompts["input_ids"].device
    with mixed_precision(device):  # bf16 on a GPU that has it
        sequences = policy.generate(
            **prompts,
            do_sample=True,
            temperature=params.temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=params.max_completion_length,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
        )
        p = prompts["input_ids"].shape[1]
        mask = completion_mask(sequences[:, p:], eos_id)
        attention_mask = torch.cat([prompts["attention_mask"], mask.long()], dim=1)
        empty = torch.empty(0, device=device)
        out = Rollout(sequences, attention_mask, mask, empty, empty, empty, empty, p)
        out.logprobs, out.values = completion_outputs(unwrap(model), out, slice(None), params.temperature)
        out.ref_logprobs = reference_logprobs(reference, out, params.temperature)
        out.scores = scores(reward, out, eos_id)
        out.logprobs, out.ref_logprobs, out.values = out.logprobs * mask, out.ref_logprobs * mask, out.values * mask
    return out


def update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Rollout,
    params: PPOParams,
    kl_coef: float,
    micro_batch_size: int,
    grad_clip: float,
    generator: torch.Generator,
) -> dict[str, float]:
    """PPO's epochs over one rollout (steps 2 and 3); the means of the losses and the clip fraction."""
    inner: Any = unwrap(model)
    inner.calibrate(batch.scores)
    kl = kl_per_token(batch.logprobs, batch.ref_logprobs, batch.mask)
    rewards = token_rewards(inner.normalise(batch.scores).float(), kl, batch.mask, kl_coef)
    advantages, returns = gae(rewards, batch.values, batch.mask, params.gamma, params.lam)
    advantages = whiten(advantages, batch.mask)
    totals = {"policy_loss": 0.0, "value_loss": 0.0, "clip_fraction": 0.0}
    updates = 0
    for _ in range(params.ppo_epochs):
        order = torch.randperm(len(batch.sequences), generator=generator)
        for start in range(0, len(order), micro_batch_size):
            rows = order[start : start + micro_batch_size].to(batch.sequences.device)
            with mixed_precision(batch.sequences.device):
                logprobs, values = completion_outputs(model, batch, rows, params.temperature)
            mask = batch.mask[rows]
            pg, clipped = policy_loss(logprobs, batch.logprobs[rows], advantages[rows], mask, params.clip_range)
            vf = value_loss(values.float(), batch.values[rows], returns[rows], mask, params.value_clip_range)
            (pg + params.vf_coef * vf).backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for name, value in (("policy_loss", pg), ("value_loss", vf), ("clip_fraction", clipped)):
                totals[name] += value.item()
            updates += 1
    return {name: value / updates for name, value in totals.items()}


def prompt_rows(step: int, rank: int, world: int, per_worker: int, count: int, seed: int) -> list[int]:
    """This worker's prompts for a step: positions of a stream that visits every prompt once per epoch, each
    epoch in an order seeded by seed + epoch (so a resumed run takes the same prompts)."""
    rows = []
    for k in range((step * world + rank) * per_worker, (step * world + rank + 1) * per_worker):
        epoch, i = divmod(k, count)
        rows.append(int(np.random.default_rng(seed + epoch).permutation(count)[i]))
    return rows


def all_mean(values: dict[str, float]) -> dict[str, float]:
    """The mean over workers of each figure."""
    names = sorted(values)
    tensor = torch.tensor([values[n] for n in names], dtype=torch.float64, device=ray.train.torch.get_device())
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return dict(zip(names, tensor.tolist(), strict=True))


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    reference: PreTrainedModel,
    reward: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    params: PPOParams,
    settings: tuple[int, int, int],
) -> dict[str, float]:
    """Mean reward, KL (nats per token, as trl's GRPO and RLOO report it, and per completion) and length
    (tokens) of completions of the held-out prompts,
    sampled with a fixed seed; each worker takes every world-th prompt. `settings`: (max prompt tokens,
    batch size, seed)."""
    max_prompt, batch_size, seed = settings
    context = ray.train.get_context()
    mine = prompts[context.get_world_rank() :: context.get_world_size()]
    device = next(reference.parameters()).device
    torch.manual_seed(seed + EVAL_SEED_OFFSET)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # reward, kl, length, count
    for start in range(0, len(mine), batch_size):
        encoded = encode_prompts(tokenizer, mine[start : start + batch_size], max_prompt)
        batch = rollout(
            model,
            reference,
            reward,
            {k: v.to(device) for k, v in encoded.items()},
            params,
            int(tokenizer.eos_token_id),
            int(tokenizer.pad_token_id),
        )
        sums += torch.stack(
            [batch.scores.sum(), batch.kl().sum(), batch.mask.sum(), batch.mask.new_tensor(len(batch.scores))]
        ).double()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    count, tokens = max(float(sums[3]), 1.0), max(float(sums[2]), 1.0)
    return {
        "eval_reward": float(sums[0]) / count,
        "eval_kl": float(sums[1]) / tokens,
        "eval_kl_per_completion": float(sums[1]) / count,
        "eval_length": float(sums[2]) / count,
    }


# -- the worker ----------------------------------------------------------------------------------------------


@dataclass
class Worker:
    """What one Ray Train worker holds: the trained policy with its value head, the frozen models, the data."""

    model: torch.nn.Module
    reference: PreTrainedModel
    reward: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    train: list[str]
    heldout: list[str]
    device: torch.device

    def prompts(self, rows: list[int], max_length: int) -> dict[str, torch.Tensor]:
        encoded = encode_prompts(self.tokenizer, [self.train[i] for i in rows], max_length)
        return {k: v.to(self.device) for k, v in encoded.items()}


def load_worker(models: Models, params: PPOParams, dataset: Path, seed: int) -> Worker:
    """The policy (from the SFT model) with a fresh value head, the reference (the same weights, frozen) and
    the reward model, on this worker's device (DDP-wrapped when there are several workers)."""
    from services.training.jobs.trl_specs import load_tokenizer

    tokenizer = load_tokenizer(models.policy)
    torch.manual_seed(seed)
    device = ray.train.torch.get_device()
    policy = AutoModelForCausalLM.from_pretrained(models.policy, dtype=torch.float32)
    model = ray.train.torch.prepare_model(PolicyWithValue(policy, params.kl_coef))
    frozen = []
    for cls, folder in ((AutoModelForCausalLM, models.policy), (AutoModelForSequenceClassification, models.reward)):
        extra: dict[str, Any] = {"num_labels": 1} if cls is AutoModelForSequenceClassification else {}
        loaded: Any = cls.from_pretrained(folder, dtype=torch.float32, **extra)
        loaded = loaded.to(device).eval()
        frozen.append(loaded.requires_grad_(False))
    train = [r["prompt"] for r in read_jsonl(dataset / "train.jsonl")]
    heldout = [r["prompt"] for r in read_jsonl(dataset / "eval.jsonl")]
    return Worker(model, frozen[0], frozen[1], tokenizer, train, heldout, device)


def train_loop(loop_config: dict[str, Any]) -> None:
    """The body every Ray Train worker runs (see the module docstring)."""
    loop = HFLoop(**loop_config["loop"])
    params = PPOParams(**loop_config["params"])
    models: Models = loop_config["models"]
    worker = WorkerRun(loop_config)
    job_id, run_id, store, artifacts, rank = worker.job_id, worker.run_id, worker.store, worker.artifacts, worker.rank
    world = ray.train.get_context().get_world_size()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    w = load_worker(models, params, worker.dataset, loop.seed)
    optimizer = build_optimizer(w.model, loop)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, loop.warmup_steps, loop.max_steps, min_lr_rate=loop.min_lr_ratio
    )
    inner: Any = unwrap(w.model)
    state = TrainState()
    latest = checkpoints.latest(artifacts, run_id)
    if latest is not None:
        state = checkpoints.restore(latest, inner, optimizer, scheduler)
        worker.resumed(latest, state.step)
    controller = AdaptiveKL(float(inner.kl_coef), params.kl_target, params.kl_horizon)
    eos, pad = int(w.tokenizer.eos_token_id), int(w.tokenizer.pad_token_id)
    held = (models.max_prompt_length, loop.micro_batch_size, loop.seed)
    if latest is None:
        worker.measure_before(lambda: evaluate(w.model, w.reference, w.reward, w.tokenizer, w.heldout, params, held))

    per_worker = loop.micro_batch_size * loop.grad_accum_steps
    generator = torch.Generator()
    reporter = Reporter(store, job_id, loop)
    while state.step < loop.max_steps:
        torch.manual_seed(loop.seed + state.step * world + rank)  # the step's sampling, the same on a resume
        generator.manual_seed(loop.seed + state.step)
        rows = prompt_rows(state.step, rank, world, per_worker, len(w.train), loop.seed)
        started = time.perf_counter()
        batch = rollout(w.model, w.reference, w.reward, w.prompts(rows, models.max_prompt_length), params, eos, pad)
        generated = time.perf_counter()
        losses = update(
            w.model, optimizer, batch, params, controller.coef, loop.micro_batch_size, loop.grad_clip, generator
        )
        scheduler.step()
        trained = time.perf_counter()
        tokens = float(batch.attention_mask.sum())
        figures = all_mean(
            {
                **losses,
                "reward": float(batch.scores.mean()),
                "kl": float(batch.kl().mean()),
                "length": float(batch.mask.sum(dim=1).mean()),
                "tokens": tokens,
                "stop": float(rank == 0 and bool(store.stop_requested(job_id))),
            }
        )
        figures["kl_coef"] = controller.coef
        controller.update(figures["kl"], per_worker * world)
        inner.kl_coef.fill_(controller.coef)
        figures["rollout_share"] = (generated - started) / (trained - started)
        state = TrainState(state.step + 1, state.tokens_seen + int(figures.pop("tokens") * world))
        stop = figures.pop("stop") > 0
        if rank == 0:
            reporter.step(state, figures, scheduler.get_last_lr()[0], tokens * world)
        if rank == 0 and (stop or state.step % loop.checkpoint_every == 0):
            saved = checkpoints.save(artifacts, run_id, state, inner, optimizer, scheduler, loop.keep_checkpoints)
            store.update(job_id, checkpoint=saved)
            store.log(
                job_id, f"step {state.step}: reward {figures['reward']:.4f}, kl {figures['kl']:.4f}; checkpoint {saved}"
            )
        if stop:
            return
    metrics = evaluate(w.model, w.reference, w.reward, w.tokenizer, w.heldout, params, held)
    if rank == 0:
        metrics = {
            **worker.with_before(metrics),
            "kl_coef": controller.coef,
            "steps": state.step,
            "tokens_seen": state.tokens_seen,
        }
        worker.finish(metrics, inner.policy.save_pretrained)


class Reporter:
    """Rank 0's progress reports, every log_every steps and at the last: the step's figures and throughput."""

    def __init__(self, store: JobStore, job_id: str, loop: HFLoop) -> None:
        self.store, self.job_id, self.loop = store, job_id, loop
        self.started, self.tokens, self.steps = time.perf_counter(), 0.0, 0

    def step(self, state: TrainState, figures: dict[str, float], learning_rate: float, tokens: float) -> None:
        self.tokens += tokens
        self.steps += 1
        if state.step % self.loop.log_every and state.step != self.loop.max_steps:
            return
        seconds = time.perf_counter() - self.started
        self.store.report_progress(
            self.job_id,
            {
                "step": state.step,
                "total_steps": self.loop.max_steps,
                "loss": figures["policy_loss"] + figures["value_loss"],
                "learning_rate": learning_rate,
                "tokens_per_second": self.tokens / max(seconds, 1e-9),
                "eta_seconds": seconds / self.steps * (self.loop.max_steps - state.step),
                "tokens_seen": state.tokens_seen,
                "values": figures,
            },
        )
        self.started, self.tokens, self.steps = time.perf_counter(), 0.0, 0


def settings(loop: HFLoop, params: PPOParams, models: Models) -> dict[str, Any]:
    """What `train_loop` takes besides the job's ids (workers.run_on_workers adds them)."""
    return {"loop": asdict(loop), "params": asdict(params), "models": models}
