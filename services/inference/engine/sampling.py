"""Sampling: request parameters, validated, turned into a pipeline of logits processors (plugins).

Each stage maps one sequence's logits [vocab] to new logits; the last draw is categorical over
their softmax with the sequence's own `torch.Generator`, so a seed fixes the output whatever the
batch around it. Greedy is the stage that keeps only the arg-max. Stages are plugins of kind
"samplers": built-ins in `BUILTINS`, third-party ones through the `llmp.samplers` entry-point
group, added to a request by spec in `SamplingParams.processors`.

Order, as in the common servers: logit bias, penalties, extra processors, then temperature (or
greedy), top-k, top-p, min-p. Reported log-probabilities are the model's own (log-softmax of
the raw logits), not of the processed distribution.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from libs.common.errors import InvalidArgument
from libs.common.plugins import Registry, parameters


@dataclass
class SamplingContext:
    """What a stage may look at besides the logits."""

    prompt_ids: list[int]
    output_ids: list[int]


class LogitsProcessor:
    """A sampling stage: logits [vocab] float32 -> logits [vocab] float32."""

    def __call__(self, logits: torch.Tensor, ctx: SamplingContext) -> torch.Tensor:
        raise NotImplementedError


class LogitBias(LogitsProcessor):
    def __init__(self, bias: Mapping[int, float]) -> None:
        self.ids = torch.tensor(list(bias), dtype=torch.long)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def __call__(self, logits: torch.Tensor, ctx: SamplingContext) -> torch.Tensor:
        return logits.index_add(0, self.ids, self.values)


class RepetitionPenalty(LogitsProcessor):
    """Divide positive (multiply negative) logits of every token already seen, prompt included."""

    def __init__(self, penalty: float) -> None:
        self.penalty = penalty

    def __call__(self, logits: torch.Tensor, ctx: SamplingContext) -> torch.Tensor:
        seen = torch.tensor(ctx.prompt_ids + ctx.output_ids, dtype=torch.long).unique()
        picked = logits[seen]
        logits = logits.clone()
        logits[seen] = torch.where(picked > 0, picked / self.penalty, picked * self.penalty)
        return logits


def output_counts(ctx: SamplingContext, vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(ctx.output_ids, dtype=torch.long), minlength=vocab).float()


class PresencePenalty(LogitsProcessor):
    """Subtract `penalty` once from every token already generated."""

    def __init__(self, penalty: float) -> None:
        self.penalty = penalty

    def __call__(self, logits: torch.Tensor, ctx: SamplingContext) -> torch.Tensor:
        return logits - self.penalty * (output_counts(ctx, logits.numel()) > 0).float()


class FrequencyPenalty(LogitsProcessor):
    """Subtract `penalty` times the number of times each token was generated."""

    def __init__(self, penalty: float) -> None:
        self.penalty = penalty

    def __call__(self, logits: torch.Tensor, ctx: SamplingContext) -> torch.Tensor:
        return logits - self.penalty * output_counts(ctx, logits.numel())


class Greedy(LogitsProcessor):
    """Keep only the most likely token (the first of equals), so the draw is deterministic."""

    def __call__(self, logits: torch.Tensor, ctx: SamplingContext) -> torch.Tensor:
        out = torch.full_like(logits, -math.inf)
        best = logits.argmax()
        out[best] = logits[best]
        return out


class Temperature(LogitsProcessor):
    def __init__(self, temperature: float) -> None:
        self.temperature = temperature

    def __call__(self, logits: torch.Tensor, ctx: SamplingContext) -> torch.Tensor:
        return logits / self.temperature


class TopK(LogitsProcessor):
    def __init__(self, k: int) -> None:
        self.k = k

    def __call__(self, logits: torch.Tensor, ctx: SamplingContext) -> torch.Tensor:
        if self.k >= logits.numel():
            return logits
        threshold = logits.topk(self.k).values[-1]
        return logits.masked_fill(logits < threshold, -math.inf)


class TopP(LogitsProcessor):
    """Keep the smallest set of most likely tokens whose probabilities sum to at least p."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, logits: torch.Tensor, ctx: SamplingContext) -> torch.Tensor:
        sorted_logits, order = logits.sort(descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= self.p  # mass before this token already reaches p
        return logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), -math.inf)


class MinP(LogitsProcessor):
    """Drop tokens less likely than `p` times the most likely one."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, logits: torch.Tensor, ctx: SamplingContext) -> torch.Tensor:
        probs = logits.softmax(-1)
        return logits.masked_fill(probs < self.p * probs.max(), -math.inf)


_MODULE = "services.inference.engine.sampling"
BUILTINS = {
    name: f"{_MODULE}:{cls}"
    for name, cls in {
        "logit_bias": "LogitBias",
        "repetition_penalty": "RepetitionPenalty",
        "presence_penalty": "PresencePenalty",
        "frequency_penalty": "FrequencyPenalty",
        "greedy": "Greedy",
        "temperature": "Temperature",
        "top_k": "TopK",
        "top_p": "TopP",
        "min_p": "MinP",
    }.items()
}
FIELD_STAGES = frozenset(BUILTINS)
"""Built-in stages a request sets through its own fields (and their bounds), never as processors."""
BUILTINS["structured"] = "services.inference.engine.structured:Structured"
CONTEXT = ("tokenizer", "vocab_size", "eos_token_ids")
"""What the engine hands to stages that take it (by these parameter names); never a request's to set."""
SAMPLERS: Registry[LogitsProcessor] = Registry("samplers", BUILTINS, base=LogitsProcessor)


@dataclass(frozen=True)
class SamplingLimits:
    """Caps a server puts on requests."""

    max_n: int = 16
    max_tokens: int = 4096
    max_logprobs: int = 20
    max_stop_strings: int = 16
    max_stop_length: int = 256
    """Characters of one stop string."""
    max_stop_token_ids: int = 64
    max_logit_bias: int = 1024
    """Entries of logit_bias."""
    max_processors: int = 8
    max_beam_width: int = 16


# Bounds of the float fields. Every value inside keeps the float32 pipeline finite: logits (at most
# about 1e5 in half precision) plus a bias of 100, over a temperature of 0.01 or divided by a
# penalty of 0.01, stay far below float32's 3.4e38; a smaller temperature is greedy in all but name.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
MAX_LOGIT_BIAS = 100.0
MAX_PENALTY = 2.0
MAX_LENGTH_PENALTY = 10.0


def _within(value: float, low: float, high: float) -> bool:
    """low <= value <= high for a finite value (NaN and infinities are never within)."""
    return math.isfinite(value) and low <= value <= high


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request; field names follow the OpenAI API."""

    max_tokens: int = 16
    temperature: float = 1.0
    """0 means greedy."""
    top_k: int = 0
    """0 means off."""
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    seed: int | None = None
    """Same seed, same output; sample i of n uses seed + i."""
    n: int = 1
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    """Stop strings; the text ends before the first one found."""
    ignore_eos: bool = False
    logprobs: int | None = None
    """None: none; k >= 0: the chosen token's log-probability and the k most likely alternatives."""
    processors: tuple[Mapping[str, Any], ...] = ()
    """Extra plugin specs {"type": name, ...params}, applied after the penalties."""
    beam_width: int = 1
    """Beam search over this many beams (1: off); the n best finished beams are returned."""
    length_penalty: float = 1.0
    """Beam search: a finished beam scores sum(logprobs) / generated_len ** length_penalty."""
    early_stopping: bool | str = False
    """Beam search stop rule, as in transformers: True, False (a heuristic) or "never"."""
    adapter: str | None = None
    """Name of a LoRA adapter loaded in the engine; None: the base model."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self, vocab_size: int, limits: SamplingLimits = SamplingLimits()) -> None:
        """Raise InvalidArgument naming the first bad field; every float must be finite and in its range."""
        for ok, name, message in self._checks(vocab_size, limits):
            if not ok:
                raise InvalidArgument(f"{message} (got {_shown(getattr(self, name))})", field=name)

    def _checks(self, vocab_size: int, limits: SamplingLimits) -> list[tuple[bool, str, str]]:
        """(holds, field, what it must be) for every field, in the order they are reported."""
        t, rp = self.temperature, self.repetition_penalty
        bias = self.logit_bias
        checks: list[tuple[bool, str, str]] = [
            (1 <= self.max_tokens <= limits.max_tokens, "max_tokens", f"must be in [1, {limits.max_tokens}]"),
            (
                t == 0 or _within(t, MIN_TEMPERATURE, MAX_TEMPERATURE),
                "temperature",
                f"must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}]",
            ),
            (self.top_k >= 0, "top_k", "must be >= 0 (0 turns it off)"),
            (_within(self.top_p, 0, 1) and self.top_p > 0, "top_p", "must be in (0, 1]"),
            (_within(self.min_p, 0, 1), "min_p", "must be in [0, 1]"),
            (
                _within(rp, MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY),
                "repetition_penalty",
                f"must be in [{MIN_REPETITION_PENALTY}, {MAX_REPETITION_PENALTY}]",
            ),
            (_within(self.presence_penalty, -MAX_PENALTY, MAX_PENALTY), "presence_penalty", "must be in [-2, 2]"),
            (_within(self.frequency_penalty, -MAX_PENALTY, MAX_PENALTY), "frequency_penalty", "must be in [-2, 2]"),
            (1 <= self.n <= limits.max_n, "n", f"must be in [1, {limits.max_n}]"),
            (len(bias) <= limits.max_logit_bias, "logit_bias", f"takes at most {limits.max_logit_bias} entries"),
            (all(0 <= t < vocab_size for t in bias), "logit_bias", f"token ids must be < {vocab_size}"),
            (
                all(_within(v, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS) for v in bias.values()),
                "logit_bias",
                f"values must be in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}]",
            ),
            (len(self.stop_token_ids) <= limits.max_stop_token_ids, "stop_token_ids", "too many token ids"),
            (all(0 <= t < vocab_size for t in self.stop_token_ids), "stop_token_ids", f"must be < {vocab_size}"),
            (len(self.stop) <= limits.max_stop_strings and all(self.stop), "stop", "too many or empty strings"),
            (all(len(s) <= limits.max_stop_length for s in self.stop), "stop", "a stop string is too long"),
            (
                self.logprobs is None or 0 <= self.logprobs <= limits.max_logprobs,
                "logprobs",
                f"must be in [0, {limits.max_logprobs}]",
            ),
            (self.seed is None or 0 <= self.seed < 2**63 - 2**16, "seed", "must be a non-negative 63-bit integer"),
            (1 <= self.beam_width <= limits.max_beam_width, "beam_width", f"must be in [1, {limits.max_beam_width}]"),
            (
                _within(self.length_penalty, -MAX_LENGTH_PENALTY, MAX_LENGTH_PENALTY),
                "length_penalty",
                f"must be in [-{MAX_LENGTH_PENALTY}, {MAX_LENGTH_PENALTY}]",
            ),
            (self.early_stopping in (True, False, "never"), "early_stopping", 'must be true, false or "never"'),
            *self._processor_checks(limits),
        ]
        if self.beam_width > 1:
            checks += [
                (self.n <= self.beam_width, "n", f"must be <= beam_width ({self.beam_width})"),
                (self.greedy, "temperature", "must be 0 with beam search, which is deterministic"),
                (len(self.specs()) == 1, "beam_width", "beam search takes no penalties, logit_bias or processors"),
                (not self.stop, "stop", "stop strings are not supported with beam search"),
                (self.logprobs is None, "logprobs", "are not returned with beam search"),
            ]
        return checks

    def _processor_checks(self, limits: SamplingLimits) -> list[tuple[bool, str, str]]:
        """Extra stages are plugins beyond the built-ins, whose values the request's own fields bound."""
        names = [p.get("type") if isinstance(p, Mapping) else None for p in self.processors]
        return [
            (len(names) <= limits.max_processors, "processors", f"takes at most {limits.max_processors} stages"),
            (all(isinstance(n, str) and n for n in names), "processors", 'each is {"type": "<name>", ...params}'),
            (
                not any(n in FIELD_STAGES for n in names),
                "processors",
                f"built-in stages ({', '.join(sorted(FIELD_STAGES))}) are set by the request's own fields",
            ),
            (
                not any(isinstance(p, Mapping) and set(p) & set(CONTEXT) for p in self.processors),
                "processors",
                f"{', '.join(CONTEXT)} are the engine's to give",
            ),
        ]

    def specs(self) -> list[Mapping[str, Any]]:
        """The pipeline as plugin specs, in order; stages that would do nothing are left out."""
        specs: list[Mapping[str, Any]] = []
        if self.logit_bias:
            specs.append({"type": "logit_bias", "bias": dict(self.logit_bias)})
        for name in ("repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value != (1.0 if name == "repetition_penalty" else 0.0):
                specs.append({"type": name, "penalty": value})
        specs.extend(self.processors)
        if self.greedy:
            return [*specs, {"type": "greedy"}]
        if self.temperature != 1.0:
            specs.append({"type": "temperature", "temperature": self.temperature})
        if self.top_k:
            specs.append({"type": "top_k", "k": self.top_k})
        if self.top_p < 1.0:
            specs.append({"type": "top_p", "p": self.top_p})
        if self.min_p > 0.0:
            specs.append({"type": "min_p", "p": self.min_p})
        return specs


def _stage(spec: Mapping[str, Any], context: Mapping[str, Any]) -> LogitsProcessor:
    """A stage from its spec, given the parts of `context` its class takes."""
    cls = SAMPLERS.get(str(spec.get("type", "")), field="processors.type")
    accepted = parameters(cls)
    return SAMPLERS.create(spec, field="processors", **{k: v for k, v in context.items() if k in accepted})


def _shown(value: Any) -> str:
    """A field's value for an error message, cut short (a map or tuple may be large)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float]
    """The most likely alternatives: token id -> log-probability."""


class Sampler:
    """One sequence's sampling state: its pipeline and its random generator."""

    def __init__(self, params: SamplingParams, seed: int, context: Mapping[str, Any] | None = None) -> None:
        """`context`: what the engine offers stages (CONTEXT); each stage gets the parts it names as parameters."""
        self.params = params
        self.stages = [_stage(spec, context or {}) for spec in params.specs()]
        self.batched = [s for s in self.stages if callable(getattr(s, "prepare_batch", None))]
        """Stages whose work the engine does for the whole batch at once each step (structured.py)."""
        self.generator = torch.Generator().manual_seed(seed)
        # Greedy with no stage before the argmax and no log-probabilities: the token is the logits'
        # argmax, which the engine takes for a whole step at once and speculation compares drafts to.
        self.plain_greedy = params.greedy and params.logprobs is None and len(self.stages) == 1

    def sample(self, logits: torch.Tensor, ctx: SamplingContext) -> tuple[int, TokenLogprob | None]:
        """logits [vocab] float32 on any device -> the chosen token and, if asked, its log-probabilities."""
        logits = logits.cpu()
        token = int(torch.multinomial(self.distribution(logits, ctx), 1, generator=self.generator))
        return token, (self.logprob(logits, token) if self.params.logprobs is not None else None)

    def distribution(self, logits: torch.Tensor, ctx: SamplingContext) -> torch.Tensor:
        """What `sample` draws from: logits [vocab] -> probabilities [vocab] float32 on the CPU."""
        processed = logits.cpu()
        for stage in self.stages:
            processed = stage(processed, ctx)
        return processed.softmax(-1)

    def logprob(self, logits: torch.Tensor, token: int) -> TokenLogprob:
        logprobs = logits.log_softmax(-1)
        top = logprobs.topk(self.params.logprobs) if self.params.logprobs else None
        alternatives = dict(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top else {}
        return TokenLogprob(token, float(logprobs[token]), alternatives)
