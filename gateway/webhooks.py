"""Stripe webhooks, the source of truth for purchases and credit payments."""

from __future__ import annotations

from aiohttp import web


def setup(app: web.Application) -> None:
    """Register this module's routes and background tasks on the application."""
