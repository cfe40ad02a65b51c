"""Organizations on the billing side: create one without a card, and its status page."""

from __future__ import annotations

from aiohttp import web


def setup(app: web.Application) -> None:
    """Register this module's routes and background tasks on the application."""
