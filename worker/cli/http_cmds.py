"""`optrack serve`: the JSON API and the live dashboard (worker.http) on one address."""

from __future__ import annotations

import sys

import click

from worker import logs
from worker.cli.common import LOG_LEVELS, ensure_schema, get_runtime, usage_error
from worker.errors import OptrackError
from worker.settings import Settings, is_loopback

TOKEN_HINT = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"


def auth_token(settings: Settings, host: str, no_auth: bool) -> str | None:
    """The token the app requires, or None for `--no-auth`; a usage error when neither holds."""
    if no_auth:
        if not is_loopback(host):
            raise usage_error(
                f"--no-auth is refused on {host}: without a token only a loopback address "
                "(127.0.0.1, ::1, localhost) may be served. Set OPTRACK_HTTP_TOKEN instead."
            )
        return None
    if not settings.http_token:
        raise usage_error(
            "OPTRACK_HTTP_TOKEN is not set: every /api/ request needs it. Set it (e.g. "
            f"export OPTRACK_HTTP_TOKEN=$({TOKEN_HINT})), or serve a loopback address "
            "with --no-auth."
        )
    return settings.http_token


def dashboard_line(base: str, token: str | None, *, show_token: bool) -> str:
    """Where to open the dashboard; the token only in a link meant for a person's terminal."""
    if token is None:
        return f"dashboard: {base}/ (no auth: loopback only)"
    if show_token:
        return f"dashboard: {base}/#token={token}"
    # Not a terminal (a service's log): the token stays out of it.
    return f"dashboard: {base}/#token=$OPTRACK_HTTP_TOKEN (or type the token into the page)"


@click.command()
@click.option("--host", help="Address to bind [default: OPTRACK_HTTP_HOST or 127.0.0.1].")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    help="Port, 0 picks a free one [default: OPTRACK_HTTP_PORT or 8080].",
)
@click.option("--no-auth", is_flag=True, help="Serve /api/ without a token (loopback only).")
@click.option("--loglevel", "-l", default="INFO", show_default=True, type=LOG_LEVELS)
def serve(host: str | None, port: int | None, no_auth: bool, loglevel: str) -> None:
    """Serve the JSON API (/api/v1) and the live dashboard (/) over HTTP."""
    from worker.http import create_app
    from worker.http.server import bind, run, url

    rt = get_runtime(click.get_current_context())
    settings = rt.settings
    host = host or settings.http_host
    port = settings.http_port if port is None else port
    token = auth_token(settings, host, no_auth)
    ensure_schema(rt)
    try:
        sock = bind(host, port)
    except OSError as exc:
        raise OptrackError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    base = url(sock)
    click.echo(f"optrack serve: listening on {base}")
    click.echo(dashboard_line(base, token, show_token=sys.stdout.isatty()))
    click.echo(f"API: {base}/api/v1 (OpenAPI: {base}/api/v1/openapi.json)", nl=True)
    sys.stdout.flush()
    logs.configure(settings, loglevel.upper())
    app = create_app(
        rt,
        token=token,
        cors_origins=settings.http_cors_origins,
        allowed_hosts=settings.http_allowed_hosts,
    )
    run(app, sock, loglevel)


COMMANDS = (serve,)
