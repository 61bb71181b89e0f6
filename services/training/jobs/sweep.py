"""A scaling-law sweep: train a ladder of small causal LMs and fit a power law to their losses.

A job config, as submitted (`tokenizer` and `corpus` are required; the loop's settings are those
of pretraining and apply to every model of the ladder):

    {"tokenizer": "code", "corpus": ["stdlib"],
     "sizes": [{"hidden_size": 32, "num_layers": 1}, {"hidden_size": 64, "num_layers": 2},
               {"hidden_size": 128, "num_layers": 4}],
     "tokens_per_param": 20, "flops_budget": 1e15}

Each model trains on `tokens_per_param` tokens per parameter (the 20:1 rule by default) unless its
entry names its `tokens`; the steps follow from the tokens a step sees. A ladder whose training
compute (6 N D, all parameters) exceeds `flops_budget`, or a model needing more than `max_steps`
steps, is refused at submission. Parameters in the fit are non-embedding ones (Kaplan et al.):
at these sizes the embedding tables dominate the count and carry little of the scaling.

The models train one after another on the same packed data, each a run of `lm_loop` with its own
checkpoints (checkpoints/<job_id>/model-<i>/), so a resumed sweep skips the finished ones and
continues the interrupted one. Progress counts the steps of the whole ladder. At the end the job
fits L(N) = E + A / N^alpha to the final held-out losses (and the Chinchilla form L(N, D) when
there are at least five points over two tokens-per-parameter ratios), stores it as the job's
metrics and as sweeps/<job_id>/fit.json, which `llmp plan compute --fit` reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from libs.common.errors import InvalidArgument
from libs.common.planning import training_flops, training_memory
from libs.common.planning.scaling import SweepFit
from services.training.dataprep.stage import field_prefix, require
from services.training.jobs import DONE, JobContext, parse_config
from services.training.jobs.data import DataConfig, causal_data, check_causal_data
from services.training.jobs.llama import LlamaShape
from services.training.jobs.lm_loop import LoopConfig
from services.training.jobs.registration import stopped_early
from services.training.jobs.resources import check_gpu, check_memory
from services.training.jobstore import JobRecord

KIND = "sweeps"
MIN_MODELS = 3
WARMUP_SHARE = 0.1  # the most of a model's steps spent warming up
DEFAULT_SIZES = [
    {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1},
    {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2},
    {"hidden_size": 96, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2},
    {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2},
]


@dataclass(kw_only=True)
class SweepConfig(DataConfig, LoopConfig):
    """A ladder of Llama-style models; `max_steps` caps each model's steps, `warmup_steps` each warm-up."""

    sizes: list[dict[str, Any]] = field(default_factory=lambda: [dict(s) for s in DEFAULT_SIZES])
    """One entry per model: LlamaShape settings, and optionally "tokens" to train it on."""
    tokens_per_param: float = 20.0
    """Training tokens per (non-embedding) parameter where an entry names no tokens."""
    flops_budget: float = 0.0
    """The most training compute (6 N D) the whole ladder may use; 0: no limit."""
    eos_token: str = ""
    max_steps: int = 100_000

    def __post_init__(self) -> None:
        self.check_data()
        super().__post_init__()
        require(len(self.sizes) >= MIN_MODELS, f"give at least {MIN_MODELS} models to fit a law to", "sizes")
        require(self.tokens_per_param > 0, "must be > 0", "tokens_per_param")
        require(self.flops_budget >= 0, "must be >= 0 (0: no limit)", "flops_budget")

    def shapes(self) -> list[tuple[LlamaShape, float]]:
        """Each model's shape and its explicit tokens (0: by tokens_per_param), checked."""
        out = []
        for i, entry in enumerate(self.sizes):
            with field_prefix(f"config.sizes[{i}]"):
                settings = dict(entry)
                tokens = settings.pop("tokens", 0)
                require(isinstance(tokens, int | float) and tokens >= 0, "must be a number >= 0", "tokens")
                try:
                    shape = LlamaShape(**settings)
                except TypeError:
                    raise InvalidArgument(
                        f"unknown setting among {sorted(settings)}; expected LlamaShape settings or tokens"
                    ) from None
                shape.check_shape()
            out.append((shape, float(tokens)))
        return out


@dataclass(frozen=True)
class Rung:
    """One model of the ladder and how long it trains."""

    shape: LlamaShape
    params: int
    """All parameters (what compute is counted on)."""
    non_embedding: int
    """What the law is fitted on."""
    steps: int
    tokens: int

    @property
    def flops(self) -> float:
        return training_flops(self.params, self.tokens)


def plan_ladder(cfg: SweepConfig, vocab_size: int) -> list[Rung]:
    """The ladder's models with their steps; refuses one over max_steps or a ladder over the budget."""
    tokens_per_step = cfg.grad_accum_steps * cfg.micro_batch_size * cfg.num_workers * cfg.seq_len
    rungs = []
    for i, (shape, tokens) in enumerate(cfg.shapes()):
        counted = shape.shape(vocab_size)
        params = counted.param_count()
        non_embedding = params - vocab_size * shape.hidden_size * (1 if shape.tie_embeddings else 2)
        wanted = tokens or cfg.tokens_per_param * non_embedding
        steps = max(2, math.ceil(wanted / tokens_per_step))
        if steps > cfg.max_steps:
            raise InvalidArgument(
                f"{wanted:.3g} tokens take {steps} steps of {tokens_per_step} tokens, over max_steps {cfg.max_steps}",
                field=f"config.sizes[{i}]",
            )
        rungs.append(Rung(shape, params, non_embedding, steps, steps * tokens_per_step))
    if len({r.non_embedding for r in rungs}) < len(rungs):
        raise InvalidArgument("two models have the same number of parameters", field="config.sizes")
    total = sum(r.flops for r in rungs)
    if cfg.flops_budget and total > cfg.flops_budget:
        raise InvalidArgument(
            f"the ladder needs {total:.3g} FLOPs (6 N D), over the budget of {cfg.flops_budget:.3g}; "
            "lower tokens_per_param or the sizes",
            field="config.flops_budget",
        )
    return rungs


def loop_for(cfg: SweepConfig, rung: Rung) -> LoopConfig:
    loop = cfg.loop()
    warmup = min(cfg.warmup_steps, int(rung.steps * WARMUP_SHARE))
    return LoopConfig(**{**loop.__dict__, "max_steps": rung.steps, "warmup_steps": warmup})


class ScalingSweepJob:
    def check(self, config: dict[str, Any], context: JobContext) -> dict[str, Any]:
        """Refuse what cannot run (shapes, budget, memory of the largest model); pins the tokeniser."""
        cfg = parse_config(SweepConfig, config)
        check_gpu(cfg.use_gpu, context)
        info = check_causal_data(cfg, context, cfg.seq_len)
        rungs = plan_ladder(cfg, info.vocab_size)
        largest = max(rungs, key=lambda r: r.params)
        need = training_memory(
            largest.shape.shape(info.vocab_size), cfg.micro_batch_size, cfg.seq_len, precision="fp32"
        )
        check_memory(context, need, what="the largest model")
        return {**config, "tokenizer": info.ref}

    def run(self, job: JobRecord, context: JobContext) -> str:
        from services.training.jobs import lm_loop, workers

        cfg = parse_config(SweepConfig, job.config)
        info, eos_id, dataset = causal_data(job, cfg, context, cfg.seq_len)
        rungs = plan_ladder(cfg, info.vocab_size)
        total = sum(r.steps for r in rungs)
        losses = []
        for i, rung in enumerate(rungs):
            run_id = f"{job.job_id}/model-{i}"
            metrics = workers.finished(context.artifacts, run_id)
            if metrics is None:
                stop = context.store.stop_requested(job.job_id)
                if stop:
                    return stop
                context.store.log(
                    job.job_id,
                    f"model {i + 1} of {len(rungs)}: {rung.non_embedding:,} non-embedding parameters, "
                    f"{rung.tokens:,} tokens ({rung.steps} steps)",
                )
                later = sum(r.steps * r.params / rung.params for r in rungs[i + 1 :])
                span = lm_loop.Span(sum(r.steps for r in rungs[:i]), total, later)
                objective = lm_loop.CausalLM(rung.shape.model_config(info.vocab_size, eos_id, cfg.seq_len))
                metrics = lm_loop.fit(job, context, dataset, objective, loop_for(cfg, rung), run_id, span)
                if metrics is None:
                    return stopped_early(job, context, f"model {i}")
            losses.append(metrics["eval_loss"])
        self._store_fit(job, context, rungs, losses)
        return DONE

    @staticmethod
    def _store_fit(job: JobRecord, context: JobContext, rungs: list[Rung], losses: list[float]) -> None:
        params = [float(r.non_embedding) for r in rungs]
        tokens = [float(r.tokens) for r in rungs]
        fit = SweepFit.fit(params, tokens, losses)
        with context.artifacts.staging(f"{KIND}/{job.job_id}", replace=True) as tmp:
            (tmp / "fit.json").write_text(fit.to_json())
        law = fit.size_law
        metrics = {"fit_E": law.E, "fit_A": law.A, "fit_alpha": law.alpha, "fit_rmse": law.rmse}
        if fit.chinchilla is not None:
            c = fit.chinchilla
            metrics |= {"chinchilla_E": c.E, "chinchilla_A": c.A, "chinchilla_B": c.B}
            metrics |= {"chinchilla_alpha": c.alpha, "chinchilla_beta": c.beta}
        for i, (n, d, loss) in enumerate(zip(params, tokens, losses, strict=True)):
            metrics |= {f"model{i}_params": n, f"model{i}_tokens": d, f"model{i}_eval_loss": loss}
        context.store.update(job.job_id, metrics=metrics)
        points = ", ".join(f"N={n:,.0f}: {loss:.3f}" for n, loss in zip(params, losses, strict=True))
        context.store.log(
            job.job_id,
            f"fit L(N) = {law.E:.3f} + {law.A:.4g} / N^{law.alpha:.3f} (rmse {law.rmse:.4f}) to {points}; "
            f"stored in {KIND}/{job.job_id}/fit.json",
        )
