"""Scaling-law fits recover the laws that generated their points, and the plan rows follow from them."""

from __future__ import annotations

import numpy as np
import pytest

from libs.common.errors import InvalidArgument
from libs.common.planning.scaling import (
    ChinchillaLaw,
    SizeLaw,
    SweepFit,
    compute_plan,
    fit_chinchilla,
    fit_size_law,
    optimal_by_ratio,
)


def test_the_size_law_is_recovered_from_noisy_points() -> None:
    truth = SizeLaw(E=1.8, A=95.0, alpha=0.42)
    params = np.geomspace(1e4, 1e7, 6)
    noise = np.random.default_rng(0).normal(0, 0.002, params.size)
    losses = np.array([truth.loss(n) for n in params]) * np.exp(noise)
    fitted = fit_size_law(params, losses)
    print(f"size law: E {fitted.E:.3f} A {fitted.A:.1f} alpha {fitted.alpha:.3f} rmse {fitted.rmse:.4f}")
    assert fitted.alpha == pytest.approx(truth.alpha, abs=0.03)
    assert pytest.approx(truth.E, abs=0.1) == fitted.E
    assert fitted.rmse < 0.005


def test_the_chinchilla_form_is_recovered_from_a_grid_of_sizes_and_ratios() -> None:
    truth = ChinchillaLaw(E=2.0, A=300.0, B=900.0, alpha=0.35, beta=0.3)
    grid = [(n, r * n) for n in np.geomspace(1e5, 1e8, 5) for r in (5, 20, 80)]
    params, tokens = (np.array(column) for column in zip(*grid, strict=True))
    losses = np.array([truth.loss(n, d) for n, d in grid])
    fitted = fit_chinchilla(params, tokens, losses)
    print(f"chinchilla: {fitted}")
    assert (fitted.alpha, fitted.beta) == (pytest.approx(0.35, abs=0.02), pytest.approx(0.3, abs=0.02))
    assert pytest.approx(2.0, abs=0.05) == fitted.E
    best, want = fitted.optimal(1e21), truth.optimal(1e21)
    assert best.params == pytest.approx(want.params, rel=0.2)


def test_too_few_points_or_one_ratio_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="at least 3"):
        fit_size_law([1e4, 1e5], [3.0, 2.5])
    with pytest.raises(InvalidArgument) as one_ratio:
        fit_chinchilla([1e4, 1e5, 1e6, 1e7, 1e8], [2e5, 2e6, 2e7, 2e8, 2e9], [4, 3.5, 3, 2.7, 2.5])
    assert one_ratio.value.field == "tokens"
    with pytest.raises(InvalidArgument):
        fit_size_law([1e4, -1e5, 1e6], [3.0, 2.5, 2.2])


def test_a_sweep_fit_round_trips_and_adds_its_rows_to_the_plan() -> None:
    truth = SizeLaw(E=1.5, A=40.0, alpha=0.3)
    params = [1e4, 3e4, 1e5, 3e5]
    sweep = SweepFit.fit(params, [20 * n for n in params], [truth.loss(n) for n in params])
    assert sweep.chinchilla is None  # one ratio: only L(N)
    again = SweepFit.from_json(sweep.to_json())
    assert again == sweep
    rows = compute_plan(1e18, 20.0, again)
    assert [r.method for r in rows][:2] == ["20 tokens per parameter", "Chinchilla fitted law"]
    ours = rows[2]
    assert ours.allocation.params == pytest.approx(optimal_by_ratio(1e18, 20).params)
    assert ours.predicted_loss == pytest.approx(truth.loss(ours.allocation.params), rel=0.01)
    with pytest.raises(InvalidArgument) as bad:
        SweepFit.from_json('{"params": []}')
    assert bad.value.field == "fit"
