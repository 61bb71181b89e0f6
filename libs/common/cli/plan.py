"""`llmp plan memory` and `llmp plan compute`: the planners' budgets, and the seed's figures checked."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from libs.common import config as cfg
from libs.common.config import CommonConfig
from libs.common.planning import (
    FORMATS,
    GB,
    GIB,
    ModelShape,
    kv_cache_bytes,
    kv_cache_bytes_per_token,
    seed_checks,
    training_memory,
)
from libs.common.planning.scaling import SweepFit, compute_plan
from libs.common.planning.seed_check import LLAMA_2_7B, LLAMA_3_8B, LLAMA_70B

console = Console()
PRESETS = {"llama-2-7b": LLAMA_2_7B, "llama-3-8b": LLAMA_3_8B, "llama-70b": LLAMA_70B}


@click.group()
def group() -> None:
    """Memory and compute budgets from closed-form formulas."""


def _shape(preset: str, config: Path | None) -> tuple[str, ModelShape]:
    if config is not None:
        return str(config), ModelShape.from_hf_config(json.loads(config.read_text()))
    return preset, PRESETS[preset]


@group.command()
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="llama-3-8b", show_default=True)
@click.option("--config", type=click.Path(exists=True, path_type=Path), help="a Hugging Face config.json instead")
@click.option("--tokens", default=4096, show_default=True, help="context for the KV cache")
@click.option("--batch", default=1, show_default=True)
@click.option("--seed", "show_seed", is_flag=True, help="also check the seed document's figures")
def memory(preset: str, config: Path | None, tokens: int, batch: int, show_seed: bool) -> None:
    """Bytes of weights per format, of KV cache, and of training, for one model."""
    name, shape = _shape(preset, config)
    params = shape.param_count()
    table = Table("format", "bits/weight", "weights GB", "weights GiB", title=f"{name}: {params / 1e9:.3f}B parameters")
    for fmt in FORMATS.values():
        size = fmt.weight_bytes(params)
        table.add_row(fmt.name, f"{fmt.bits_per_weight():.3f}", f"{size / GB:.2f}", f"{size / GIB:.2f}")
    console.print(table)
    kv = Table(
        "KV dtype", "bytes/token", f"{tokens} tokens x {batch}", title="KV cache (2 x layers x kv_heads x head_dim)"
    )
    for dtype in ("fp32", "bf16", "fp8"):
        total = kv_cache_bytes(shape, tokens, batch, dtype)
        kv.add_row(dtype, f"{kv_cache_bytes_per_token(shape, dtype):,}", f"{total / GIB:.3f} GiB ({total / GB:.3f} GB)")
    console.print(kv)
    train = training_memory(shape, batch=batch, seq_len=tokens)
    console.print(
        f"training (bf16 mixed, AdamW, batch {batch} x {tokens}): weights {train.weights / GB:.1f} GB, "
        f"gradients {train.gradients / GB:.1f} GB, optimiser {train.optimizer / GB:.1f} GB, "
        f"fp32 master {train.master_weights / GB:.1f} GB, activations {train.activations / GB:.1f} GB, "
        f"total {train.total / GB:.1f} GB"
    )
    if show_seed:
        _print_seed_checks()


@group.command()
@click.argument("budget", type=float, required=False)
@click.option("--flops", type=float, help="training budget in FLOPs (e.g. 1e21); or give it as the argument")
@click.option("--ratio", default=20.0, show_default=True, help="tokens per parameter for the rule of thumb")
@click.option("--fit", "fit", default="", help="a sweep's fit: its fit.json, or the sweep job's id (local store)")
@click.option("--seed", "show_seed", is_flag=True, help="also check the seed document's figures")
def compute(budget: float | None, flops: float | None, ratio: float, fit: str, show_seed: bool) -> None:
    """Compute-optimal parameters and tokens for a FLOP budget BUDGET (C = 6 N D): `llmp plan compute 1e21`."""
    if (budget is None) == (flops is None):
        raise click.UsageError("give the FLOP budget once: `llmp plan compute 1e21` or `--flops 1e21`")
    flops = budget if budget is not None else flops
    assert flops is not None
    table = Table("method", "parameters", "tokens", "tokens/param", "predicted loss", title=f"C = {flops:.3g} FLOPs")
    for row in compute_plan(flops, ratio, _sweep_fit(fit) if fit else None):
        alloc = row.allocation
        table.add_row(
            row.method,
            f"{alloc.params / 1e9:.3f}B",
            f"{alloc.tokens / 1e9:.1f}B",
            f"{alloc.tokens_per_param:.1f}",
            "" if row.predicted_loss is None else f"{row.predicted_loss:.3f}",
        )
    console.print(table)
    if show_seed:
        _print_seed_checks()


def _sweep_fit(ref: str) -> SweepFit:
    """A fit file, else the fit a sweep job stored in the local artifact store (sweeps/<job_id>/fit.json)."""
    path = Path(ref)
    if not path.is_file():
        path = cfg.load(CommonConfig, "common").artifacts_path / "sweeps" / ref / "fit.json"
    if not path.is_file():
        raise click.BadParameter(f"no fit file and no sweep job {ref!r} in the artifact store", param_hint="--fit")
    return SweepFit.from_json(path.read_text())


def _print_seed_checks() -> None:
    table = Table("seed's figure", "seed", "formula", "unit", "agrees", "note", title="the seed document, recomputed")
    for check in seed_checks():
        mark = "[green]yes[/]" if check.agrees else "[red]no[/]"
        table.add_row(check.item, f"{check.seed:g}", f"{check.computed:.4g}", check.unit, mark, check.note)
    console.print(table)
