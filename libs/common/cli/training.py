"""`llmp train ...`: submit, follow and control training jobs, and look up registered models.

    llmp train submit pretrain tokenizer=code corpus=[stdlib] model_name=tiny max_steps=500 --watch
    llmp train submit prepare tokenizer=code corpus=[stdlib] seq_len=256 --watch
    llmp train submit pretrain tokenizer=code dataset=<prepare job id> model_name=tiny
    llmp train submit distill --config distill.yaml target=tiny:latest
    llmp train submit sft base=tiny:latest data=[pydoc:instructions] model_name=tiny-sft lora_rank=8
    llmp train watch <job id>          # a progress bar: steps, loss, tokens/s, ETA; log lines
    llmp train list --state RUNNING
    llmp train cancel | resume | get <job id>
    llmp train models [prefix] / llmp train model tiny:latest

A job's config is a YAML/JSON file (--config) and/or KEY=VALUE pairs, which win; each value is
read as YAML, so `max_steps=500` is a number and `corpus=[a, b]` a list.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click
import yaml
from google.protobuf import json_format
from llmp.training.v1 import training_pb2 as pb
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from libs.common.cli.rpc_errors import remote
from libs.common.clients.training import TrainingClient

console = Console()
STATES = [name for name, _ in pb.Job.State.items() if name != "STATE_UNSPECIFIED"]


def parse_config(path: Path | None, pairs: Iterable[str]) -> dict[str, Any]:
    """The job config from a YAML/JSON file and KEY=VALUE pairs (values parsed as YAML)."""
    config: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise click.BadParameter(f"{path} must hold a mapping of settings", param_hint="--config")
        config.update(loaded)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="CONFIG")
        try:
            config[key] = yaml.safe_load(value) if value else ""
        except yaml.YAMLError:
            config[key] = value
        if isinstance(config[key], str):  # YAML 1.1 reads 3e-4 (no dot) as text
            with contextlib.suppress(ValueError):
                config[key] = float(config[key])
    return config


def state_name(job: pb.Job) -> str:
    return pb.Job.State.Name(job.state)


def follow(client: TrainingClient, job_id: str) -> pb.Job:
    """Show the job's progress until it ends; returns its final state."""
    final = client.get(job_id)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  {task.fields[speed]} tok/s  ETA {task.fields[eta]}{task.fields[values]}"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task(f"{final.type} {job_id}", total=None, loss="-", speed="-", eta="-", values="")
        for event in client.watch(job_id):
            final = event.job
            if event.log:
                bar.console.print(f"[dim]{event.log}[/]")
            p = event.progress if event.HasField("progress") else None
            if p is not None and p.total_steps:
                bar.update(
                    task,
                    total=p.total_steps,
                    completed=p.step,
                    loss=f"{p.loss:.4f}",
                    speed=f"{p.tokens_per_second:,.0f}",
                    eta=f"{p.eta_seconds:.0f}s",
                    values="".join(f"  {k} {v:.4g}" for k, v in sorted(p.values.items())),
                )
    colour = {"SUCCEEDED": "green", "FAILED": "red"}.get(state_name(final), "yellow")
    console.print(f"[{colour}]{state_name(final).lower()}[/] {job_id}" + (f": {final.reason}" if final.reason else ""))
    output = f"model {final.model}" if final.model else f"data set {final.dataset}" if final.dataset else ""
    if output:
        console.print(f"{output}; " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(final.metrics.items())))
    return final


def show_job(job: pb.Job) -> None:
    console.print_json(json.dumps(json_format.MessageToDict(job)))


@click.group()
def group() -> None:
    """Training jobs (prepare, pretrain, mlm, distill, sweep, sft, reward, dpo, grpo) and the model registry."""


@group.command()
@click.argument("job_type")
@click.argument("settings", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--token", default="", help="idempotency key: submitting again with it returns the same job")
@click.option("--watch/--no-watch", default=False, help="follow the job until it ends")
def submit(job_type: str, settings: tuple[str, ...], config_file: Path | None, token: str, watch: bool) -> None:
    """Submit a JOB_TYPE job; bad settings are refused before anything starts."""
    config = parse_config(config_file, settings)
    with remote("training service"):
        client = TrainingClient()
        job = client.submit(job_type, config, client_token=token)
        console.print(f"submitted {job.type} job [bold]{job.job_id}[/] ({state_name(job).lower()})")
        if watch:
            final = follow(client, job.job_id)
            if final.state != pb.Job.SUCCEEDED:
                raise click.exceptions.Exit(1)


@group.command()
@click.argument("job_id")
def watch(job_id: str) -> None:
    """Follow a job: a progress bar with steps, loss, tokens/s and ETA, and its log lines."""
    with remote("training service"):
        follow(TrainingClient(), job_id)


@group.command(name="list")
@click.option("--state", type=click.Choice(STATES))
@click.option("--type", "job_type", default="")
@click.option("--limit", default=50, show_default=True)
def list_jobs(state: str | None, job_type: str, limit: int) -> None:
    """Jobs, newest first."""
    with remote("training service"):
        jobs = TrainingClient().list_jobs(state or "", job_type, limit)
    table = Table()
    table.add_column("job", no_wrap=True, min_width=max((len(j.job_id) for j in jobs), default=3))  # copyable
    for heading in ("type", "state", "step", "loss", "output", "created"):
        table.add_column(heading)
    for j in jobs:
        step = f"{j.progress.step}/{j.progress.total_steps}" if j.progress.total_steps else ""
        loss = f"{j.progress.loss:.4f}" if j.progress.total_steps else ""
        table.add_row(j.job_id, j.type, state_name(j).lower(), step, loss, j.model or j.dataset, j.created_at)
    console.print(table)


@group.command()
@click.argument("job_id")
def get(job_id: str) -> None:
    """A job as JSON."""
    with remote("training service"):
        show_job(TrainingClient().get(job_id))


@group.command()
@click.argument("job_id")
def cancel(job_id: str) -> None:
    """Stop a job; it keeps its last checkpoint."""
    with remote("training service"):
        job = TrainingClient().cancel(job_id)
    console.print(f"{job.job_id}: {state_name(job).lower()}")


@group.command()
@click.argument("job_id")
@click.option("--watch/--no-watch", default=False)
def resume(job_id: str, watch: bool) -> None:
    """Start a failed or cancelled job again from its last checkpoint."""
    with remote("training service"):
        client = TrainingClient()
        job = client.resume(job_id)
        console.print(f"{job.job_id}: {state_name(job).lower()} (attempt {job.attempts})")
        if watch:
            follow(client, job_id)


@group.command()
@click.argument("prefix", default="")
def models(prefix: str) -> None:
    """Registered models (every version), by name."""
    with remote("training service"):
        found = TrainingClient().models(prefix)
    table = Table("model", "parameters", "parent", "job", "metrics", "created")
    for m in found:
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in sorted(m.metrics.items()))
        table.add_row(m.ref, f"{m.parameters:,}", m.lineage.parent, m.lineage.job_id, metrics, m.created_at)
    console.print(table)


@group.command()
@click.argument("ref")
def model(ref: str) -> None:
    """One model ("name", "name:latest" or "name:N") as JSON: files, lineage, metrics."""
    with remote("training service"):
        found = TrainingClient().model(ref)
    console.print_json(json.dumps(json_format.MessageToDict(found)))
