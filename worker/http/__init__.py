"""The HTTP adapter: a JSON API and a live dashboard over tracking, reports, listing, health."""

from worker.http.app import create_app

__all__ = ["create_app"]
