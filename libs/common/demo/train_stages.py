"""Stages 3 and 4: plan, pretrain and distil (the seed's section 4), then align (section 5).

3. A scaling sweep (a ladder of small models on the prepared data) fits L(N) = E + A / N^alpha; the
   planner splits the run's compute budget (C = 6 N D of the target's pretraining) and predicts
   the target's loss, which the pretraining job then reaches or not. A draft model for
   speculative decoding is distilled from the pretrained target, on the corpora the target read
   (the serving stage measures its acceptance both with that target and with the aligned model it
   drafts for: alignment moves the target away from the text the draft learnt to imitate).
4. Alignment: the steps in ALIGNMENT, in order, each a training job on the output of an earlier one:
   SFT on instruction pairs, then on preference pairs whose rejected answer is plausible but wrong
   (a function's body with one corruption, another function's docstring) a reward model, PPO
   against it (the RLHF path) and DPO. The list is data: a new objective is one more entry (its
   steps come from Profile.align_steps[job type]). The last step whose model is a policy is served.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from libs.common.clients.tokenizer import TokenizerClient
from libs.common.demo.jobs import run_job
from libs.common.demo.runner import StageContext
from libs.common.planning import ModelShape
from libs.common.planning.scaling import ChinchillaLaw, SizeLaw, compute_plan, training_flops


def _loop(ctx: StageContext, steps: int) -> dict[str, Any]:
    """The loop settings every pretraining-family job of the run shares."""
    p = ctx.profile
    return {
        "seq_len": p.seq_len,
        "micro_batch_size": p.micro_batch,
        "learning_rate": p.learning_rate,
        "num_workers": p.num_workers,
        "max_steps": steps,
        "warmup_steps": max(1, steps // 10),
        "checkpoint_every": steps,
        "log_every": max(1, steps // 20),
    }


def _shape(settings: dict[str, int], vocab: int) -> ModelShape:
    heads = settings["num_heads"]
    return ModelShape(
        num_layers=settings["num_layers"],
        hidden_size=settings["hidden_size"],
        num_heads=heads,
        vocab_size=vocab,
        num_kv_heads=settings["num_kv_heads"],
        intermediate_size=-(-8 * settings["hidden_size"] // 3 // 64) * 64,
    )


def _steps(ctx: StageContext, settings: dict[str, int], vocab: int) -> tuple[int, int]:
    """(non-embedding parameters, steps) of a model trained on tokens_per_param tokens per such parameter."""
    p = ctx.profile
    non_embedding = _shape(settings, vocab).param_count() - 2 * vocab * settings["hidden_size"]
    per_step = p.micro_batch * p.seq_len * p.num_workers
    return non_embedding, max(2, -(-int(p.tokens_per_param * non_embedding) // per_step))


def pretraining(ctx: StageContext) -> dict[str, Any]:
    p = ctx.profile
    data = ctx.results["data"]
    dataset, tokenizer = data["dataset_job"], data["tokenizer"]
    vocab = TokenizerClient().describe(tokenizer).vocab_size
    ladder_steps = sum(_steps(ctx, size, vocab)[1] for size in p.ladder)
    non_embedding, steps = _steps(ctx, p.target, vocab)
    ctx.total(ladder_steps + steps + p.distill_steps)

    sweep_cfg = {
        "tokenizer": tokenizer,
        "dataset": dataset,
        "sizes": p.ladder,
        "tokens_per_param": p.tokens_per_param,
        **_loop(ctx, 100_000),
        "warmup_steps": 2,
        "log_every": 5,
    }
    sweep = run_job(ctx, "sweep", sweep_cfg, "sweep", label="sweep")
    law = SizeLaw(sweep.metrics["fit_E"], sweep.metrics["fit_A"], sweep.metrics["fit_alpha"], sweep.metrics["fit_rmse"])
    ctx.say(f"sweep fit L(N) = {law.E:.2f} + {law.A:.3g} / N^{law.alpha:.3f} over {len(p.ladder)} models")

    target = _shape(p.target, vocab)
    tokens = steps * p.micro_batch * p.seq_len * p.num_workers
    budget = training_flops(target.param_count(), tokens)
    predicted = law.loss(non_embedding)
    plan = [
        {
            "method": r.method,
            "params": r.allocation.params,
            "tokens": r.allocation.tokens,
            "predicted_loss": r.predicted_loss,
        }
        for r in compute_plan(budget, p.tokens_per_param)
    ]
    ctx.say(
        f"budget C = 6 N D = {budget:.3g} FLOPs: {target.param_count():,} parameters ({non_embedding:,} "
        f"non-embedding) on {tokens:,} tokens; the sweep's law predicts a held-out loss of {predicted:.3f}"
    )

    config = {"tokenizer": tokenizer, "dataset": dataset, "model_name": ctx.name("lm"), **p.target, **_loop(ctx, steps)}
    lm = run_job(ctx, "pretrain", config, "pretrain", offset=ladder_steps, label="pretrain")
    ctx.say(
        f"pretrained {lm.model}: held-out loss {lm.metrics['eval_loss']:.3f} (predicted {predicted:.3f}), "
        f"perplexity {lm.metrics['perplexity']:.1f}"
    )

    # the target was trained on a prepared data set; its draft names the corpora themselves
    corpus = [data["corpora"][k]["name"] for k in ("code", "prose")]
    draft_cfg = {
        "target": lm.model,
        "model_name": ctx.name("draft"),
        "corpus": corpus,
        **p.draft,
        **_loop(ctx, p.distill_steps),
    }
    draft = run_job(ctx, "distill", draft_cfg, "distill", offset=ladder_steps + steps, label="distill")
    ctx.say(f"distilled draft {draft.model}: top-1 agreement with the target {draft.metrics['top1_agreement']:.2f}")
    paper = ChinchillaLaw()
    return {
        "sweep": sweep.to_dict(),
        "law": {"E": law.E, "A": law.A, "alpha": law.alpha, "rmse": law.rmse},
        "ladder": [
            {
                "params": sweep.metrics[f"model{i}_params"],
                "tokens": sweep.metrics[f"model{i}_tokens"],
                "loss": sweep.metrics[f"model{i}_eval_loss"],
            }
            for i in range(len(p.ladder))
        ],
        "budget_flops": budget,
        "plan": plan,
        "target": {
            "params": target.param_count(),
            "non_embedding": non_embedding,
            "tokens": tokens,
            "predicted_loss": predicted,
            "paper_predicted_loss": paper.loss(target.param_count(), tokens),
            "reached_loss": lm.metrics["eval_loss"],
        },
        "pretrain": lm.to_dict(),
        "distill": draft.to_dict(),
    }


@dataclass(frozen=True)
class AlignStep:
    """One alignment job of the run."""

    key: str
    job_type: str
    base: str
    """Whose model it starts from: "pretrain" or an earlier step's key."""
    data: tuple[str, ...]
    shows: tuple[str, ...]
    """Held-out metrics shown before and after (the job records `<name>_before` too)."""
    policy: bool = True
    """Its model can be served (a reward model cannot)."""
    models: dict[str, str] = field(default_factory=dict)
    """Further config settings naming an earlier step's model, e.g. {"reward_model": "reward"}."""
    settings: dict[str, Any] = field(default_factory=dict)


PREFERENCES = ("code:preferences",)
"""Chosen over plausible but wrong answers a small model can learn to rank (the reward model, PPO's prompts, DPO)."""

ALIGNMENT: list[AlignStep] = [
    AlignStep(
        "sft",
        "sft",
        "pretrain",
        ("pydoc:instructions",),
        ("eval_loss", "perplexity", "eval_token_accuracy"),
        settings={"learning_rate": 1e-3},
    ),
    AlignStep(
        "reward",
        "reward",
        "sft",
        PREFERENCES,
        ("eval_accuracy", "eval_margin"),
        policy=False,
        settings={"learning_rate": 1e-3},
    ),
    AlignStep(
        "ppo",
        "ppo",
        "sft",
        PREFERENCES,
        ("eval_reward", "eval_kl"),
        models={"reward_model": "reward"},
        settings={"learning_rate": 5e-4, "kl_coef": 0.05, "max_completion_length": 24},
    ),
    AlignStep(
        "dpo",
        "dpo",
        "sft",
        PREFERENCES,
        ("eval_reward_accuracy", "eval_reward_margin", "eval_logp_chosen", "eval_logp_rejected"),
        settings={"learning_rate": 2e-4, "beta": 0.1},
    ),
]


def alignment(ctx: StageContext) -> dict[str, Any]:
    p = ctx.profile
    steps = [s for s in ALIGNMENT]
    ctx.total(sum(p.align_steps[s.job_type] for s in steps))
    models = {"pretrain": ctx.results["pretraining"]["pretrain"]["model"]}
    done: dict[str, Any] = {}
    offset = 0
    for step in steps:
        n = p.align_steps[step.job_type]
        config = {
            "base": models[step.base],
            "data": list(step.data),
            "model_name": ctx.name(step.key),
            "max_steps": n,
            "warmup_steps": max(1, n // 10),
            "checkpoint_every": n,
            "log_every": 1,
            "micro_batch_size": min(p.micro_batch, 8),
            "max_length": p.align_length,
            "max_records": p.align_records,
            "num_workers": p.num_workers,
            **{k: models[v] for k, v in step.models.items()},
            **step.settings,
        }
        job = run_job(ctx, step.job_type, config, step.key, offset=offset, label=step.key)
        offset += n
        models[step.key] = job.model
        before_after = {m: (job.metrics.get(f"{m}_before"), job.metrics.get(m)) for m in step.shows}
        shown = ", ".join(f"{m} {_num(b)} -> {_num(a)}" for m, (b, a) in before_after.items())
        ctx.say(f"{step.key}: {job.model}; held out {shown}")
        done[step.key] = {
            **job.to_dict(),
            "job_type": step.job_type,
            "policy": step.policy,
            "before_after": before_after,
        }
    served = next(s.key for s in reversed(steps) if s.policy)
    return {"steps": done, "order": [s.key for s in steps], "served": served, "served_model": models[served]}


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
