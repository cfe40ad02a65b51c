"""Trial reminders at 7, 3 and 1 days left and on expiry, each at most once."""

from __future__ import annotations

from aiohttp import web


def setup(app: web.Application) -> None:
    """Register this module's routes and background tasks on the application."""
