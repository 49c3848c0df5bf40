"""`optrack tokens`: tokens of the HTTP API, each scoped to accounts and maybe read-only.

`add` prints the token once, on stdout alone (for `$(…)`); only its SHA-256 is stored, so it
cannot be shown again. OPTRACK_HTTP_TOKEN stays the all-access token beside these.
"""

from __future__ import annotations

from typing import Any

import click
from rich.table import Table

from worker.cli.common import ensure_schema, get_runtime
from worker.cli.render import console
from worker.records import iso
from worker.reports.formats import to_json
from worker.tokens import Tokens, TokenView, validate_token_name


def _record(view: TokenView) -> dict[str, Any]:
    return {
        "name": view.name,
        "accounts": None if view.accounts is None else list(view.accounts),
        "read_only": view.read_only,
        "created_at": iso(view.created_at),
        "revoked_at": iso(view.revoked_at),
    }


@click.group()
def tokens() -> None:
    """Tokens of the HTTP API, scoped to accounts (OPTRACK_HTTP_TOKEN: all access)."""


@tokens.command("add")
@click.argument("name")
@click.option(
    "--account",
    "accounts",
    multiple=True,
    metavar="NAME",
    help="Only this account's operations (repeat; none: every account).",
)
@click.option("--read-only", is_flag=True, help="May read, never change anything.")
def add(name: str, accounts: tuple[str, ...], read_only: bool) -> None:
    """Mint a token and print it, once: it is stored only as a hash."""
    validate_token_name(name)
    rt = get_runtime(click.get_current_context())
    ensure_schema(rt)
    with rt.sessions.begin() as session:
        token, view = Tokens(session).add(name, accounts, read_only, rt.clock.now())
    scope = "every account" if view.accounts is None else ", ".join(view.accounts)
    kind = "read-only" if view.read_only else "read-write"
    click.echo(f"token {name} ({kind}, {scope}); it is shown this once:", err=True)
    click.echo(token)


@tokens.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_tokens(as_json: bool) -> None:
    """Every token's name, accounts and kind (never the token)."""
    rt = get_runtime(click.get_current_context())
    ensure_schema(rt)
    with rt.sessions() as session:
        records = [_record(v) for v in Tokens(session).views()]
    if as_json:
        click.echo(to_json({"tokens": records}))
        return
    table = Table(title=f"{len(records)} token(s)", title_justify="left")
    for column in ("name", "accounts", "kind", "created", "revoked"):
        table.add_column(column, no_wrap=True)
    for r in records:
        table.add_row(
            r["name"],
            "(every account)" if r["accounts"] is None else ", ".join(r["accounts"]),
            "read-only" if r["read_only"] else "read-write",
            r["created_at"],
            r["revoked_at"] or "-",
        )
    console().print(table)


@tokens.command("revoke")
@click.argument("name")
def revoke(name: str) -> None:
    """Revoke a token: from now on it gets 401."""
    validate_token_name(name)
    rt = get_runtime(click.get_current_context())
    ensure_schema(rt)
    with rt.sessions.begin() as session:
        Tokens(session).revoke(name, rt.clock.now())
    click.echo(f"token {name} revoked")


COMMANDS = (tokens,)
__all__ = ["COMMANDS"]
