"""Scaling-law planner: compute-optimal model and data sizes, and power-law fits to measured losses.

Training compute is ``C ~= 6 N D`` FLOPs for N parameters and D tokens (2 for the forward pass and
4 for the backward, per parameter per token). Two ways to split a budget C:

- the rule of thumb of about 20 tokens per parameter: ``D = 20 N``, so ``N = sqrt(C / 120)``;
- the Chinchilla paper's fitted loss (Hoffmann et al. 2022, approach 3)
  ``L(N, D) = E + A / N^alpha + B / D^beta``. Minimising it on ``6 N D = C`` gives
  ``N_opt = G (C / 6)^(beta / (alpha + beta))`` and ``D_opt = (C / 6) / N_opt`` with
  ``G = (alpha A / (beta B))^(1 / (alpha + beta))``.

The two disagree: with the published (rounded) constants the fitted law puts far more tokens on each
parameter, e.g. 32B parameters on 3.0T tokens (~93 per parameter) at Chinchilla's own budget of
5.76e23 FLOPs, where the rule gives 69B on 1.4T. Both are offered; neither is the truth for our data.

:func:`fit_power_law` fits ``L(C) = a C^(-b) (+ e)`` to (compute, loss) points from our own runs,
such as the ladder of small models a sweep job trains.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import least_squares

from libs.common.errors import InvalidArgument

FLOPS_PER_PARAM_TOKEN = 6  # forward 2 + backward 4


@dataclass(frozen=True)
class Allocation:
    """A split of a compute budget into model size and training tokens."""

    params: float
    tokens: float

    @property
    def flops(self) -> float:
        return training_flops(self.params, self.tokens)

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.params


def training_flops(params: float, tokens: float) -> float:
    """FLOPs to train ``params`` parameters on ``tokens`` tokens: 6 N D."""
    return FLOPS_PER_PARAM_TOKEN * params * tokens


def optimal_by_ratio(flops: float, tokens_per_param: float = 20.0) -> Allocation:
    """N and D with D = r N and 6 N D = C: N = sqrt(C / (6 r))."""
    _require_positive(flops, "flops")
    _require_positive(tokens_per_param, "tokens_per_param")
    params = math.sqrt(flops / (FLOPS_PER_PARAM_TOKEN * tokens_per_param))
    return Allocation(params, tokens_per_param * params)


@dataclass(frozen=True)
class ChinchillaLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta; defaults are the paper's published fit (loss in nats)."""

    E: float = 1.69
    A: float = 406.4
    B: float = 410.7
    alpha: float = 0.34
    beta: float = 0.28

    def loss(self, params: float, tokens: float) -> float:
        return self.E + self.A / params**self.alpha + self.B / tokens**self.beta

    def optimal(self, flops: float) -> Allocation:
        """The N and D minimising L(N, D) subject to 6 N D = C (closed form, see module docstring)."""
        _require_positive(flops, "flops")
        a, b = self.alpha, self.beta
        g = (a * self.A / (b * self.B)) ** (1 / (a + b))
        budget = flops / FLOPS_PER_PARAM_TOKEN  # N * D
        params = g * budget ** (b / (a + b))
        return Allocation(params, budget / params)


@dataclass(frozen=True)
class PowerLawFit:
    """L(C) = a * C^(-b) + e, fitted to measured points."""

    a: float
    b: float
    e: float = 0.0
    """Irreducible loss; 0 when the fit had none."""
    rmse: float = 0.0
    """Root-mean-square error of log L over the points fitted."""

    def predict(self, flops: float | np.ndarray) -> float | np.ndarray:
        return self.a * np.asarray(flops, dtype=float) ** (-self.b) + self.e


def fit_power_law(
    flops: list[float] | np.ndarray, losses: list[float] | np.ndarray, irreducible: bool = False
) -> PowerLawFit:
    """Least-squares fit of L(C) = a C^(-b) (+ e) in log space (errors relative, as losses are).

    Without ``irreducible`` this is a straight line in log-log coordinates. With it, ``e`` is
    bounded to [0, min(loss)) and the fit is nonlinear, started from the straight-line fit.
    Compute is rescaled by its geometric mean inside the fit to keep the problem well conditioned.
    """
    c, loss = np.asarray(flops, dtype=float), np.asarray(losses, dtype=float)
    if c.shape != loss.shape or c.ndim != 1:
        raise InvalidArgument("flops and losses must be 1-D and of equal length", field="losses")
    if c.size < (4 if irreducible else 2):
        raise InvalidArgument(f"need at least {4 if irreducible else 2} points", field="flops")
    if (c <= 0).any() or (loss <= 0).any():
        raise InvalidArgument("compute and loss must be positive", field="flops")
    scale = float(np.exp(np.log(c).mean()))
    x = c / scale
    slope, intercept = np.polyfit(np.log(x), np.log(loss), 1)
    if not irreducible:
        rmse = float(np.sqrt(np.mean((intercept + slope * np.log(x) - np.log(loss)) ** 2)))
        return PowerLawFit(a=math.exp(intercept) * scale ** (-slope), b=-slope, rmse=rmse)

    def residuals(p: np.ndarray) -> np.ndarray:
        log_a, b, e = p
        return np.log(np.exp(log_a) * x ** (-b) + e) - np.log(loss)

    floor = float(loss.min())
    start = np.array([intercept, max(-slope, 1e-3), 0.0])
    bounds = ([-np.inf, 0.0, 0.0], [np.inf, np.inf, floor * (1 - 1e-9)])  # e stays below every loss
    result = least_squares(residuals, start, bounds=bounds)
    log_a, b, e = result.x
    rmse = float(np.sqrt(np.mean(result.fun**2)))
    return PowerLawFit(a=math.exp(log_a) * scale**b, b=float(b), e=float(e), rmse=rmse)


def _require_positive(value: float, field: str) -> None:
    if not value > 0:
        raise InvalidArgument("must be > 0", field=field)


@dataclass(frozen=True)
class SizeLaw:
    """L(N) = E + A / N^alpha: held-out loss against parameters, along one tokens-per-parameter path.

    A ladder trained at a fixed ratio (e.g. 20 tokens per parameter) cannot separate the N and D
    terms of the Chinchilla form (D moves with N), so this is what such a ladder identifies.
    """

    E: float
    A: float
    alpha: float
    rmse: float = 0.0
    """Root-mean-square error of log L over the points fitted."""

    def loss(self, params: float) -> float:
        return self.E + self.A / params**self.alpha


def _log_residual_fit(
    residuals: Any, starts: list[np.ndarray], bounds: tuple[list[float], list[float]]
) -> tuple[np.ndarray, float]:
    """The best of several bounded least-squares runs (the fits have local minima)."""
    best = None
    for start in starts:
        result = least_squares(residuals, start, bounds=bounds)
        if best is None or result.cost < best.cost:
            best = result
    assert best is not None
    return best.x, float(np.sqrt(np.mean(best.fun**2)))


def _check_points(columns: list[np.ndarray], minimum: int) -> None:
    if any(c.shape != columns[0].shape or c.ndim != 1 for c in columns):
        raise InvalidArgument("the points' columns must be 1-D and of equal length", field="losses")
    if columns[0].size < minimum:
        raise InvalidArgument(f"need at least {minimum} points, got {columns[0].size}", field="losses")
    if any((c <= 0).any() for c in columns):
        raise InvalidArgument("parameters, tokens and losses must be positive", field="losses")


def fit_size_law(params: list[float] | np.ndarray, losses: list[float] | np.ndarray) -> SizeLaw:
    """Least-squares fit of L(N) = E + A / N^alpha in log space, E bounded to [0, min(loss)).

    N is rescaled by its geometric mean inside the fit to keep it well conditioned; several
    starting values of E are tried and the best fit kept.
    """
    n, loss = np.asarray(params, dtype=float), np.asarray(losses, dtype=float)
    _check_points([n, loss], 3)
    scale = float(np.exp(np.log(n).mean()))
    x = n / scale
    floor = float(loss.min())

    def residuals(p: np.ndarray) -> np.ndarray:
        log_a, alpha, e = p
        return np.log(e + np.exp(log_a) * x ** (-alpha)) - np.log(loss)

    starts = []
    for share in (0.0, 0.5, 0.9):
        e = share * floor
        slope, intercept = np.polyfit(np.log(x), np.log(loss - e), 1)
        starts.append(np.array([intercept, max(-slope, 1e-3), e]))
    bounds = ([-np.inf, 0.0, 0.0], [np.inf, 10.0, floor * (1 - 1e-9)])
    (log_a, alpha, e), rmse = _log_residual_fit(residuals, starts, bounds)
    return SizeLaw(E=float(e), A=float(math.exp(log_a) * scale**alpha), alpha=float(alpha), rmse=rmse)


def fit_chinchilla(
    params: list[float] | np.ndarray, tokens: list[float] | np.ndarray, losses: list[float] | np.ndarray
) -> ChinchillaLaw:
    """Fit L(N, D) = E + A / N^alpha + B / D^beta (the Chinchilla paper's approach 3) in log space.

    Needs at least five points and two different tokens-per-parameter ratios among them: with one
    ratio D is a multiple of N and the two power terms cannot be told apart.
    """
    n, d, loss = (np.asarray(v, dtype=float) for v in (params, tokens, losses))
    _check_points([n, d, loss], 5)
    if np.unique(np.round(np.log(d / n), 6)).size < 2:
        raise InvalidArgument("the points share one tokens-per-parameter ratio; L(N, D) needs two", field="tokens")
    sn, sd = float(np.exp(np.log(n).mean())), float(np.exp(np.log(d).mean()))
    x, y = n / sn, d / sd
    floor = float(loss.min())

    def residuals(p: np.ndarray) -> np.ndarray:
        log_a, log_b, alpha, beta, e = p
        return np.log(e + np.exp(log_a) * x ** (-alpha) + np.exp(log_b) * y ** (-beta)) - np.log(loss)

    starts = [
        np.array([math.log(share * floor / 2), math.log(share * floor / 2), a, b, (1 - share) * floor])
        for share in (0.2, 0.5, 0.8)
        for a, b in ((0.3, 0.3), (0.6, 0.2), (0.2, 0.6))
    ]
    bounds = ([-np.inf, -np.inf, 0.0, 0.0, 0.0], [np.inf, np.inf, 10.0, 10.0, floor * (1 - 1e-9)])
    (log_a, log_b, alpha, beta, e), _ = _log_residual_fit(residuals, starts, bounds)
    return ChinchillaLaw(
        E=float(e),
        A=float(math.exp(log_a) * sn**alpha),
        B=float(math.exp(log_b) * sd**beta),
        alpha=float(alpha),
        beta=float(beta),
    )


@dataclass(frozen=True)
class SweepFit:
    """What a scaling sweep measured and fitted; stored as JSON (sweeps/<job_id>/fit.json)."""

    params: list[float]
    """Non-embedding parameters of each model of the ladder."""
    tokens: list[float]
    losses: list[float]
    """Final held-out loss (nats per token) of each model."""
    size_law: SizeLaw
    chinchilla: ChinchillaLaw | None = None
    """Set when the points allowed the L(N, D) form (see fit_chinchilla)."""

    @classmethod
    def fit(cls, params: list[float], tokens: list[float], losses: list[float]) -> SweepFit:
        chinchilla = None
        ratios = {round(math.log(t / p), 6) for p, t in zip(params, tokens, strict=True)}
        if len(params) >= 5 and len(ratios) >= 2:
            chinchilla = fit_chinchilla(params, tokens, losses)
        return cls(list(params), list(tokens), list(losses), fit_size_law(params, losses), chinchilla)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> SweepFit:
        try:
            data = json.loads(text)
            chinchilla = data.get("chinchilla")
            return cls(
                params=data["params"],
                tokens=data["tokens"],
                losses=data["losses"],
                size_law=SizeLaw(**data["size_law"]),
                chinchilla=ChinchillaLaw(**chinchilla) if chinchilla else None,
            )
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InvalidArgument(f"not a sweep fit: {e}", field="fit") from None


@dataclass(frozen=True)
class PlanRow:
    """One way of splitting a budget, as `llmp plan compute` prints it."""

    method: str
    allocation: Allocation
    predicted_loss: float | None
    """Under the law the row comes from; None where that law cannot say."""


def compute_plan(flops: float, tokens_per_param: float = 20.0, sweep: SweepFit | None = None) -> list[PlanRow]:
    """The rule of thumb, the Chinchilla paper's law and, given a sweep, our own fits, for one budget.

    The rule's and the paper's rows predict losses with the paper's law (its data, its tokeniser).
    A sweep's L(N) was measured along its own tokens-per-parameter path, so it predicts the loss of
    the rule's split only; its L(N, D), when the sweep had one, gives its own optimum.
    """
    paper = ChinchillaLaw()
    by_rule = optimal_by_ratio(flops, tokens_per_param)
    rows = [
        PlanRow(f"{tokens_per_param:g} tokens per parameter", by_rule, paper.loss(by_rule.params, by_rule.tokens)),
        PlanRow("Chinchilla fitted law", (best := paper.optimal(flops)), paper.loss(best.params, best.tokens)),
    ]
    if sweep is not None:
        ratio = float(np.exp(np.mean(np.log(np.asarray(sweep.tokens) / np.asarray(sweep.params)))))
        along = optimal_by_ratio(flops, ratio)
        rows.append(PlanRow(f"sweep L(N) at {ratio:.3g} tokens/param", along, sweep.size_law.loss(along.params)))
        if sweep.chinchilla is not None:
            own = sweep.chinchilla.optimal(flops)
            rows.append(PlanRow("sweep L(N, D)", own, sweep.chinchilla.loss(own.params, own.tokens)))
    return rows
