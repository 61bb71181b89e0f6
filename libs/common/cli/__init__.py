"""The `llmp` command line: the local stack (`up`, `down`, `status`), settings, plugins, the demo,
and one sub-command group per installed service (entry points in `llmp.cli`)."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import sys

import click
from rich.console import Console
from rich.table import Table

from libs.common import config as cfg
from libs.common.config import CommonConfig
from libs.common.errors import LlmpError
from libs.common.settings import VARIABLES

console = Console()
log = logging.getLogger(__name__)


def common_config() -> CommonConfig:
    return cfg.load(CommonConfig, "common")


@click.group()
@click.option(
    "--gateway",
    "gateway",
    default=None,
    envvar="LLMP_GATEWAY_URL",
    help="send every command through the gateway at this gRPC address, with LLMP_API_KEY (or the admin key file)",
)
def cli(gateway: str | None) -> None:
    """llmp: train, align, serve and retrieve with language models, as services."""
    if gateway:
        from libs.common.clients.gateway import api_key

        os.environ["LLMP_API_KEY"] = api_key()
        for service in ("tokenizer", "retrieval", "training", "inference", "gateway"):
            os.environ[f"LLMP_{service.upper()}_ADDRESS"] = gateway


@cli.command()
@click.option("--only", multiple=True, help="start only these services (repeatable)")
@click.option("--timeout", default=120.0, show_default=True, help="seconds to wait for SERVING")
def up(only: tuple[str, ...], timeout: float) -> None:
    """Start Redis and every installed service locally; wait until all are SERVING."""
    from libs.common.stack import LocalStack

    with console.status("starting the local stack"):
        rows = LocalStack(common_config()).up(list(only) or None, timeout)
    _print_status(rows)


@cli.command()
def down() -> None:
    """Stop the local stack (services drain first, Redis last)."""
    from libs.common.stack import LocalStack

    stopped = LocalStack(common_config()).down()
    console.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")


@cli.command()
def status() -> None:
    """Show each local process and its health."""
    from libs.common.stack import LocalStack

    _print_status(LocalStack(common_config()).status())


def _print_status(rows: list) -> None:
    table = Table("component", "state", "address", "pid")
    for row in rows:
        colour = "green" if row.state in ("SERVING", "RUNNING") else "red"
        table.add_row(row.name, f"[{colour}]{row.state}[/]", row.address, str(row.pid or "-"))
    console.print(table)


@cli.group()
def config() -> None:
    """Settings: every LLMP_* variable, and the values in effect."""


@config.command("vars")
def config_vars() -> None:
    """List every variable a user can set, with its default."""
    table = Table("variable", "default", "meaning")
    for var in VARIABLES.values():
        table.add_row(var.name, var.default, var.doc)
    console.print(table)


@config.command("show")
def config_show() -> None:
    """Show the shared settings in effect (defaults < file < environment)."""
    table = Table("setting", "value", "meaning")
    from libs.common.secrets import redact

    for name, value, text in cfg.describe(common_config()):
        table.add_row(name, redact(value) if name == "redis_url" else str(value), text)
    console.print(table)


@cli.command()
def plugins() -> None:
    """List the algorithm plugins each installed registry can load."""
    from libs.common.plugins import GROUPS

    table = Table("group", "third-party plugins installed")
    for group in GROUPS:
        names = sorted(ep.name for ep in importlib.metadata.entry_points(group=group))
        table.add_row(group, ", ".join(names) or "-")
    console.print(table)


@cli.command()
@click.option(
    "--profile",
    "profile_name",
    type=click.Choice(["tiny", "quick", "full"]),
    default="quick",
    show_default=True,
    help="tiny: minutes (tests); quick: ~15 minutes on two cores; full: larger models",
)
@click.option("--fresh", is_flag=True, help="start over; otherwise the stages a previous run finished are kept")
@click.option("--open", "open_report", is_flag=True, help="serve the report on 127.0.0.1 when the run is done")
def demo(profile_name: str, fresh: bool, open_report: bool) -> None:
    """The main job: data, tokenisers, pretraining, alignment, serving and RAG on the running stack, with a report."""
    from libs.common.demo import run, serve_report

    page = run(console, profile_name, fresh)
    if open_report:
        serve_report(console, page)


def _add_groups() -> None:
    from libs.common.cli import plan

    cli.add_command(plan.group, "plan")
    for ep in importlib.metadata.entry_points(group="llmp.cli"):  # one group per installed service
        try:
            cli.add_command(ep.load(), ep.name)
        except Exception as e:  # a service whose extra is not installed simply has no commands
            log.debug("no commands from %s: %s", ep.name, e)


def main() -> None:
    _add_groups()
    try:
        cli.main(standalone_mode=False)
    except LlmpError as e:
        console.print(f"[red]error:[/] {e.message}")
        sys.exit(2)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
