"""Scaling-law planner: the 20:1 rule, the Chinchilla fit's closed form, and power-law fits."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from libs.common.errors import InvalidArgument
from libs.common.planning import ChinchillaLaw, fit_power_law, optimal_by_ratio, training_flops


def test_flops_and_the_twenty_tokens_rule_by_hand() -> None:
    assert training_flops(175e9, 300e9) == pytest.approx(3.15e23)
    # C = 120 N^2 at 20 tokens per parameter: C = 1.2e20 gives N = 1e9, D = 2e10.
    plan = optimal_by_ratio(1.2e20)
    assert plan.params == pytest.approx(1e9) and plan.tokens == pytest.approx(2e10)
    assert plan.flops == pytest.approx(1.2e20) and plan.tokens_per_param == pytest.approx(20)
    assert optimal_by_ratio(1.2e20, tokens_per_param=5).params == pytest.approx(2e9)


def test_chinchilla_closed_form_matches_numeric_minimisation() -> None:
    law = ChinchillaLaw()
    for flops in (1e18, 3.15e23, 5.76e23, 1e25):
        plan = law.optimal(flops)
        assert plan.flops == pytest.approx(flops)
        # Minimise L(N, C / 6N) over log N numerically, independently of the closed form.
        result = minimize_scalar(
            lambda log_n, c=flops: law.loss(math.exp(log_n), c / 6 / math.exp(log_n)),
            bounds=(math.log(1e3), math.log(1e14)),
            method="bounded",
            options={"xatol": 1e-10},
        )
        assert plan.params == pytest.approx(math.exp(result.x), rel=1e-4)


def test_chinchilla_scaling_exponents_and_values_by_hand() -> None:
    law = ChinchillaLaw()
    # N_opt grows as C^(beta / (alpha + beta)) = C^(0.28 / 0.62) = C^0.4516, D_opt as C^0.5484.
    small, large = law.optimal(1e20), law.optimal(1e24)
    assert math.log10(large.params / small.params) / 4 == pytest.approx(0.28 / 0.62)
    assert math.log10(large.tokens / small.tokens) / 4 == pytest.approx(0.34 / 0.62)
    # G = (0.34 * 406.4 / (0.28 * 410.7))^(1 / 0.62) = 1.2015722^1.6129032 = 1.3447106
    plan = law.optimal(6.0)  # C / 6 = 1, so N = G and D = 1 / G
    assert plan.params == pytest.approx(1.3447106, rel=1e-7)
    # At Chinchilla's budget, 5.76e23 FLOPs: N = G * (9.6e22)^0.4516 ~ 32.2B on ~2.98T tokens.
    chinchilla = law.optimal(5.76e23)
    assert chinchilla.params == pytest.approx(32.19e9, rel=1e-3)
    assert chinchilla.tokens == pytest.approx(2.982e12, rel=1e-3)
    assert law.loss(70e9, 1.4e12) == pytest.approx(1.69 + 406.4 / 70e9**0.34 + 410.7 / 1.4e12**0.28)


def test_pure_power_law_is_recovered_exactly() -> None:
    flops = np.logspace(15, 19, 6)
    fit = fit_power_law(flops, 40.0 * flops**-0.08)
    assert (fit.a, fit.b, fit.e) == (pytest.approx(40.0, rel=1e-9), pytest.approx(0.08, rel=1e-9), 0.0)
    assert fit.rmse < 1e-12
    assert fit.predict(1e21) == pytest.approx(40.0 * 1e21**-0.08)


def test_irreducible_term_is_recovered_from_noisy_points() -> None:
    rng = np.random.default_rng(0)
    flops = np.logspace(15, 19, 9)
    losses = (1.7 + 1000.0 * flops**-0.2) * np.exp(rng.normal(0, 0.002, flops.size))
    fit = fit_power_law(flops, losses, irreducible=True)
    assert fit.e == pytest.approx(1.7, abs=0.05)
    assert fit.b == pytest.approx(0.2, abs=0.02)
    assert fit.predict(1e21) == pytest.approx(1.7 + 1000.0 * 1e21**-0.2, rel=0.01)
    assert fit.rmse < 0.005


@pytest.mark.parametrize(
    ("flops", "losses", "irreducible", "field"),
    [
        ([1e18], [3.0], False, "flops"),
        ([1e18, 1e19, 1e20], [3.0, 2.8, 2.6], True, "flops"),
        ([1e18, -1e19], [3.0, 2.8], False, "flops"),
        ([1e18, 1e19], [3.0], False, "losses"),
    ],
)
def test_bad_fit_input_names_the_field(flops, losses, irreducible: bool, field: str) -> None:
    with pytest.raises(InvalidArgument, match=field):
        fit_power_law(flops, losses, irreducible=irreducible)


def test_bad_budget_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="flops"):
        optimal_by_ratio(0)
    with pytest.raises(InvalidArgument, match="tokens_per_param"):
        optimal_by_ratio(1e20, tokens_per_param=-1)
