"""`llmp keys ...`: make, list and revoke the gateway's API keys (needs an admin key).

    llmp keys create ci --scope inference --scope retrieval --ttl 86400
    llmp keys list
    llmp keys revoke <key id>

The admin key comes from LLMP_API_KEY, else $LLMP_HOME/secrets/admin.key (written by the
gateway on its first start); the gateway from LLMP_GATEWAY_ADDRESS.
"""

from __future__ import annotations

import time

import click
from rich.console import Console
from rich.table import Table

from libs.common.cli.rpc_errors import remote
from libs.common.clients.gateway import GatewayClient

console = Console()
SCOPES = ["inference", "retrieval", "training", "tokenizer", "admin"]


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(seconds)) if seconds else "never"


@click.group()
def group() -> None:
    """API keys of the gateway: create (shown once), list, revoke."""


@group.command()
@click.argument("name")
@click.option("--scope", "scopes", multiple=True, required=True, type=click.Choice(SCOPES), help="repeatable")
@click.option("--ttl", default=0.0, show_default=True, help="seconds until it expires; 0: never")
@click.option("--rpm", type=int, default=None, help="requests per minute (default: the gateway's; 0: unlimited)")
@click.option("--tpm", type=int, default=None, help="tokens per minute (default: the gateway's; 0: unlimited)")
def create(name: str, scopes: tuple[str, ...], ttl: float, rpm: int | None, tpm: int | None) -> None:
    """Make key NAME with these scopes; the key is printed once and never again."""
    with remote("gateway"):
        reply = GatewayClient().create_key(name, list(scopes), ttl, rpm, tpm)
    console.print(f"key {reply.info.id} ({', '.join(reply.info.scopes)}), expires {_when(reply.info.expires_at)}:")
    click.echo(reply.key)


@group.command("list")
def list_() -> None:
    """Every key (ids and scopes, never secrets)."""
    with remote("gateway"):
        keys = GatewayClient().list_keys()
    table = Table("id", "name", "scopes", "created", "expires", "state", "rpm", "tpm")
    for k in keys:
        expired = bool(k.expires_at) and k.expires_at <= time.time()
        state = "[red]revoked[/]" if k.revoked else "[red]expired[/]" if expired else "[green]active[/]"
        rpm = str(k.requests_per_minute) if k.HasField("requests_per_minute") else "default"
        tpm = str(k.tokens_per_minute) if k.HasField("tokens_per_minute") else "default"
        table.add_row(k.id, k.name, ",".join(k.scopes), _when(k.created_at), _when(k.expires_at), state, rpm, tpm)
    console.print(table)


@group.command()
@click.argument("key_id")
def revoke(key_id: str) -> None:
    """Refuse key KEY_ID from now on."""
    with remote("gateway"):
        GatewayClient().revoke_key(key_id)
    console.print(f"revoked {key_id}")
