"""The live dashboard at ``/``: one page and its script and styles, served from the package.

Nothing is loaded from outside (the CSP says so to the browser); the page reads the API with
the token it takes once from ``/#token=…`` or its form, kept in sessionStorage.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

from worker.reports.formats import STATUS_COLORS

STATIC = Path(__file__).with_name("static")
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
def index() -> Response:
    """The dashboard page."""
    return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"), headers=PAGE_HEADERS)


@router.get("/palette.css")
def palette() -> Response:
    """The status colours, from the one palette the charts, reports and terminal use."""
    names = {status: status.lower().replace("_", "-") for status in STATUS_COLORS}
    lines = "".join(f"  --{names[status]}: {color};\n" for status, color in STATUS_COLORS.items())
    css = f":root {{\n{lines}}}\n"
    return Response(css, media_type="text/css", headers={"Cache-Control": "no-cache"})


def mount(app: FastAPI) -> None:
    """Serve the page's script, styles and icon under ``/static``."""
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
