"""`llmp plan`: the printed budgets come from the planners' formulas."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from libs.common.cli.plan import PRESETS, group
from libs.common.planning import GB, optimal_by_ratio, weight_bytes
from libs.common.planning.seed_check import LLAMA_3_8B


def test_plan_memory_prints_the_formula_values() -> None:
    result = CliRunner().invoke(
        group, ["memory", "--preset", "llama-3-8b", "--tokens", "4096", "--seed"], terminal_width=240
    )
    assert result.exit_code == 0, result.output
    assert "8.030B parameters" in result.output
    assert f"{weight_bytes(LLAMA_3_8B.param_count(), 'bf16') / GB:.2f}" in result.output
    assert "0.500 GiB" in result.output, "LLaMA-3-8B keeps 0.5 GiB of bf16 KV cache per 4K tokens"
    assert "the seed document, recomputed" in result.output


def test_plan_compute_splits_a_budget() -> None:
    result = CliRunner().invoke(group, ["compute", "--flops", "1e21"], terminal_width=240)
    assert result.exit_code == 0, result.output
    rule = optimal_by_ratio(1e21)
    assert f"{rule.params / 1e9:.3f}B" in result.output and "Chinchilla fitted law" in result.output


#: Parameter counts the models' authors publish (safetensors totals of each Hugging Face release).
PUBLISHED_PARAMETERS = {"llama-2-7b": 6_738_415_616, "llama-3-8b": 8_030_261_248, "llama-70b": 70_553_706_496}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_has_its_published_parameter_count(preset: str) -> None:
    assert set(PRESETS) == set(PUBLISHED_PARAMETERS), "a new preset needs its published count here"
    assert PRESETS[preset].param_count() == pytest.approx(PUBLISHED_PARAMETERS[preset], rel=0.01)
    result = CliRunner().invoke(group, ["memory", "--preset", preset], terminal_width=240)
    assert result.exit_code == 0, result.output
    assert f"{PUBLISHED_PARAMETERS[preset] / 1e9:.2f}" in result.output


def test_plan_compute_takes_the_budget_as_its_argument_as_the_readme_shows() -> None:
    positional = CliRunner().invoke(group, ["compute", "1e18"], terminal_width=240)
    flag = CliRunner().invoke(group, ["compute", "--flops", "1e18"], terminal_width=240)
    assert positional.exit_code == 0, positional.output
    assert positional.output == flag.output
    assert f"{optimal_by_ratio(1e18).params / 1e9:.3f}B" in positional.output
    twice = CliRunner().invoke(group, ["compute", "1e18", "--flops", "1e19"])
    assert twice.exit_code == 2 and "give the FLOP budget once" in twice.output
    neither = CliRunner().invoke(group, ["compute"])
    assert neither.exit_code == 2 and "give the FLOP budget once" in neither.output
