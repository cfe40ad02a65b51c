"""Upgrading through Stripe Checkout (annual only), buying credits, and stripe-setup."""

from __future__ import annotations

from aiohttp import web


def setup(app: web.Application) -> None:
    """Register this module's routes and background tasks on the application."""
