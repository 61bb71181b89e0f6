"""`llmp plan`: the printed budgets come from the planners' formulas."""

from __future__ import annotations

from click.testing import CliRunner

from libs.common.cli.plan import group
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
