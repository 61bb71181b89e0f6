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

import math
from dataclasses import dataclass

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
