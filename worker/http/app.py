"""The app factory: the API behind the token, /healthz, the dashboard, the limits and headers."""

from __future__ import annotations

import json
from functools import partial

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker import tokens
from worker.http import dashboard, dead_letter_routes, notice_routes, problems, routes, waits
from worker.http.auth import BearerAuth, all_accounts
from worker.http.guards import SameSiteGuard
from worker.http.openapi import FORBIDDEN, OpenApiApp
from worker.runtime import Runtime

# 10,000 IDs of the longest form, quoted and comma-separated, are about 550 kB.
MAX_BODY = 1024 * 1024
OPENAPI_URL = "/api/v1/openapi.json"
API_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


class ApiHeaders:
    """``Cache-Control: no-store`` and ``nosniff`` on every /api/ answer (plain ASGI: cheap)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/api/"):
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = [(k.lower().encode(), v.encode()) for k, v in API_HEADERS.items()]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)


class BodyLimit:
    """Refuse a request body over ``max_bytes`` with 413, before it is parsed or buffered whole."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit() or int(declared) > self.max_bytes:
                if declared.isdigit() and int(declared) <= 8 * self.max_bytes:
                    await self._drain(receive)
                await self._refuse(send)
                return
            await self.app(scope, receive, send)
            return
        # No Content-Length (chunked): read at most max_bytes, then hand it on as one message.
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, receive, send)  # a disconnect: let the app see it
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                if message.get("more_body", False):
                    await self._drain(receive)
                await self._refuse(send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _drain(self, receive: Receive) -> None:
        """Read (a bounded amount of) the rest, so the client gets the 413 and not a reset."""
        left = 8 * self.max_bytes
        while left > 0:
            message = await receive()
            left -= len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                return

    async def _refuse(self, send: Send) -> None:
        reason = f"request body over {self.max_bytes:,} bytes; send fewer IDs per request"
        body = json.dumps({"errors": [{"reason": reason}]}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def create_app(
    rt: Runtime,
    *,
    token: str | None,
    cors_origins: tuple[str, ...] = (),
    allowed_hosts: tuple[str, ...] = (),
) -> FastAPI:
    """The HTTP app on ``rt``; ``token=None`` serves the API without auth (`--no-auth`).

    ``allowed_hosts``: Host names answered besides the address listened on (``guards``).
    """
    app = OpenApiApp(
        title="optrack",
        summary="Track Twilio Comms SenderPool operations: the intake and the reports over HTTP",
        version="1",
        # The OpenAPI document sits behind the token, like all of /api/; no docs pages
        # (they load their scripts from a CDN, and the dashboard loads nothing from outside).
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.runtime = rt
    auth = BearerAuth(token, partial(tokens.look_up, rt.sessions))
    app.state.auth = auth
    problems.install(app)
    app.include_router(routes.api, dependencies=[Depends(auth)])
    # Deployment-wide: dead letters and notices are not filtered by account (403 if scoped).
    everything = [Depends(auth), Depends(all_accounts)]
    app.include_router(dead_letter_routes.router, dependencies=everything, responses=FORBIDDEN)
    app.include_router(notice_routes.router, dependencies=everything, responses=FORBIDDEN)
    app.include_router(waits.router, dependencies=[Depends(auth)])
    app.include_router(routes.public)
    app.include_router(dashboard.router)
    dashboard.mount(app)

    @app.get(OPENAPI_URL, include_in_schema=False, dependencies=[Depends(auth)])
    def openapi(request: Request) -> JSONResponse:
        return JSONResponse(request.app.openapi())

    if cors_origins:  # off unless OPTRACK_HTTP_CORS_ORIGINS names origins
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            max_age=600,
        )
    app.add_middleware(ApiHeaders)
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY)
    # Outermost: another site's request is refused before anything else reads it.
    app.add_middleware(SameSiteGuard, allowed_hosts=allowed_hosts)
    return app
