"""`optrack accounts`: the Twilio accounts optrack polls, each with its own credentials.

A secret is read from stdin (a prompt that does not echo on a terminal), ``--secret-env VAR``
or ``--secret-file PATH``, sealed with OPTRACK_SECRET_KEY and stored; nothing prints it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from worker.accounts import Accounts, AccountView
from worker.cli.common import FiniteRange, ensure_schema, get_runtime, usage_error
from worker.cli.render import console
from worker.credentials import (
    ACCOUNT_SID,
    API_KEY_SID,
    DEFAULT_ACCOUNT,
    Vault,
    validate_account_name,
    validate_secret,
    validate_sid,
)
from worker.errors import AccountError
from worker.records import iso
from worker.reports.formats import to_json
from worker.runtime import Runtime

MAX_SECRET_FILE = 4096


def _read_secret(secret_env: str | None, secret_file: str | None) -> str:
    """The secret from one source; a usage error names the source, never the value."""
    if secret_env is not None and secret_file is not None:
        raise usage_error("give the secret one way: --secret-env or --secret-file (or stdin)")
    if secret_env is not None:
        # Read here, once: settings never hold another account's secret.
        value = os.environ.get(secret_env)
        if value is None:
            raise usage_error(f"--secret-env {secret_env}: that variable is not set")
        return validate_secret(value)
    if secret_file is not None:
        path = Path(secret_file)
        try:
            with path.open("rb") as handle:
                raw = handle.read(MAX_SECRET_FILE + 1)
        except OSError as exc:
            raise usage_error(f"--secret-file {secret_file}: {exc.strerror}") from None
        if len(raw) > MAX_SECRET_FILE:
            raise usage_error(f"--secret-file {secret_file}: more than {MAX_SECRET_FILE} bytes")
        try:
            return validate_secret(raw.decode())
        except UnicodeDecodeError:
            raise usage_error(f"--secret-file {secret_file}: not UTF-8 text") from None
    if sys.stdin.isatty():
        return validate_secret(click.prompt("secret", hide_input=True, err=True))
    return validate_secret(sys.stdin.read(MAX_SECRET_FILE + 1)[:MAX_SECRET_FILE])


def _vault(rt: Runtime) -> Vault:
    return Vault(rt.settings.secret_keys)


def _record(view: AccountView, rt: Runtime) -> dict[str, Any]:
    sid = view.account_sid if view.stored else (rt.settings.account_sid or None)
    key = view.api_key_sid if view.stored else (rt.settings.api_key_sid or None)
    return {
        "name": view.name,
        "account_sid": sid,
        "api_key_sid": key,
        "auth": "api key" if key else "auth token",
        "credentials": "stored (encrypted)" if view.stored else "environment",
        "max_requests_per_second": (
            view.max_requests_per_second or rt.settings.max_requests_per_second
        ),
        "created_at": iso(view.created_at),
        "secret_set_at": iso(view.secret_set_at),
        "active_operations": view.active,
        "ended_operations": view.ended,
    }


@click.group()
def accounts() -> None:
    """The Twilio accounts optrack polls, each with its own credentials (`default`: the
    environment's)."""


_secret_options = [
    click.option("--secret-env", metavar="VAR", help="Read the secret from this variable."),
    click.option("--secret-file", metavar="PATH", help="Read the secret from this file."),
]


def _with_secret_options(command: Any) -> Any:
    for option in reversed(_secret_options):
        command = option(command)
    return command


@accounts.command("add")
@click.argument("name")
@click.option("--account-sid", required=True, metavar="AC…", help="The account's SID.")
@click.option(
    "--api-key-sid", metavar="SK…", help="Authenticate with this API key (else the Auth Token)."
)
@_with_secret_options
@click.option(
    "--max-requests-per-second",
    type=FiniteRange(0.1, 10_000.0),
    help="This account's own request budget (else OPTRACK_MAX_REQUESTS_PER_SECOND).",
)
def add(
    name: str,
    account_sid: str,
    api_key_sid: str | None,
    secret_env: str | None,
    secret_file: str | None,
    max_requests_per_second: float | None,
) -> None:
    """Add an account; its secret (Auth Token or API key secret) from stdin, or as told."""
    validate_account_name(name)
    if name == DEFAULT_ACCOUNT:
        raise AccountError("`default` is the environment's account (TWILIO_*); choose another name")
    validate_sid(account_sid, ACCOUNT_SID, "an account SID")
    if api_key_sid is not None:
        validate_sid(api_key_sid, API_KEY_SID, "an API key SID")
    rt = get_runtime(click.get_current_context())
    vault = _vault(rt)  # before reading a secret: no key, nothing asked
    secret = _read_secret(secret_env, secret_file)
    ensure_schema(rt)
    if account_sid == rt.settings.account_sid:
        raise AccountError(
            f"{account_sid} is the default account's (TWILIO_ACCOUNT_SID): track under "
            "`default`, one name per SID"
        )
    with rt.sessions.begin() as session:
        Accounts(session).add(
            name,
            account_sid,
            api_key_sid,
            vault.seal(secret),
            rt.clock.now(),
            max_requests_per_second,
        )
    auth = f"API key {api_key_sid}" if api_key_sid else "its Auth Token"
    click.echo(f"account {name} added: {account_sid}, with {auth} (stored encrypted)")


@accounts.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_accounts(as_json: bool) -> None:
    """Every account: SID, how it authenticates, its operations."""
    rt = get_runtime(click.get_current_context())
    ensure_schema(rt)
    with rt.sessions() as session:
        views = Accounts(session).views()
    records = [_record(v, rt) for v in views]
    if as_json:
        click.echo(to_json({"accounts": records}))
        return
    table = Table(title=f"{len(records)} account(s)", title_justify="left")
    for column in ("name", "account SID", "auth", "credentials", "active", "ended"):
        table.add_column(column, no_wrap=True)
    for r in records:
        auth = r["auth"] + (f" {r['api_key_sid']}" if r["api_key_sid"] else "")
        table.add_row(
            r["name"],
            r["account_sid"] or "(unset)",
            auth,
            r["credentials"],
            str(r["active_operations"]),
            str(r["ended_operations"]),
        )
    console().print(table)


@accounts.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show(name: str, as_json: bool) -> None:
    """One account (never its secret)."""
    validate_account_name(name)
    rt = get_runtime(click.get_current_context())
    ensure_schema(rt)
    with rt.sessions() as session:
        [view] = Accounts(session).views([name])
    record = _record(view, rt)
    if as_json:
        click.echo(to_json(record))
        return
    for key, value in record.items():
        click.echo(f"{key}: {'-' if value is None else value}")


@accounts.command("set-secret")
@click.argument("name")
@click.option("--api-key-sid", metavar="SK…", help="A new API key (else the current one).")
@click.option("--auth-token", is_flag=True, help="The secret is the Auth Token (no API key).")
@_with_secret_options
def set_secret(
    name: str,
    api_key_sid: str | None,
    auth_token: bool,
    secret_env: str | None,
    secret_file: str | None,
) -> None:
    """Replace an account's secret (a rotation); running workers use it from their next poll."""
    validate_account_name(name)
    if api_key_sid is not None and auth_token:
        raise usage_error("--api-key-sid and --auth-token exclude each other")
    if api_key_sid is not None:
        validate_sid(api_key_sid, API_KEY_SID, "an API key SID")
    rt = get_runtime(click.get_current_context())
    vault = _vault(rt)
    secret = _read_secret(secret_env, secret_file)
    ensure_schema(rt)
    with rt.sessions.begin() as session:
        store = Accounts(session)
        key = None if auth_token else (api_key_sid or store.get(name).api_key_sid)
        store.set_secret(name, vault.seal(secret), key, rt.clock.now())
    click.echo(f"account {name}: secret replaced" + (f" (API key {key})" if key else ""))


@accounts.command("set-budget")
@click.argument("name")
@click.argument("rate")
def set_budget(name: str, rate: str) -> None:
    """Set the account's own requests per second (RATE), or `off` for the setting's."""
    validate_account_name(name)
    value: float | None = None
    if rate != "off":
        value = FiniteRange(0.1, 10_000.0).convert(rate, None, click.get_current_context())
    rt = get_runtime(click.get_current_context())
    ensure_schema(rt)
    with rt.sessions.begin() as session:
        Accounts(session).set_budget(name, value)
    shown = "OPTRACK_MAX_REQUESTS_PER_SECOND's" if value is None else f"{value:g} per second"
    click.echo(f"account {name}: request budget {shown}")


@accounts.command("remove")
@click.argument("name")
@click.option(
    "--delete-operations",
    is_flag=True,
    help="Also stop tracking its operations and delete them with their history.",
)
def remove(name: str, delete_operations: bool) -> None:
    """Remove an account; refused while it has operations unless --delete-operations."""
    validate_account_name(name)
    rt = get_runtime(click.get_current_context())
    ensure_schema(rt)
    with rt.sessions.begin() as session:
        deleted = Accounts(session).remove(name, delete_operations=delete_operations)
    click.echo(f"account {name} removed" + (f"; {deleted} operation(s) deleted" if deleted else ""))


@accounts.command("rotate-key")
def rotate_key() -> None:
    """Seal every stored secret again with the first key of OPTRACK_SECRET_KEY."""
    rt = get_runtime(click.get_current_context())
    vault = _vault(rt)
    ensure_schema(rt)
    with rt.sessions.begin() as session:
        store = Accounts(session)
        sealed = store.sealed()
        for name, token in sealed:
            store.reseal(name, vault.reseal(token))
    click.echo(f"{len(sealed)} secret(s) sealed with the first key; older keys may go now")


COMMANDS = (accounts,)
__all__ = ["COMMANDS"]
