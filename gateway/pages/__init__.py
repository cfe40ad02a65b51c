"""The pages people look at: sign-in, the organization, its subscription, invitations.

Server-rendered HTML (aiohttp-jinja2), plain CSS, no script. Each page does what the JSON
API does through the same functions in `accounts/`, for a signed-in browser
(`sessions`); `render` maps the one error hierarchy to pages.
"""

from __future__ import annotations

from aiohttp import web

from gateway.pages import billing, invitation, organization, signin
from gateway.pages.assets import setup_assets


def setup(app: web.Application) -> None:
    """Templates, the stylesheet, and every page's routes."""
    setup_assets(app)
    for module in (signin, organization, billing, invitation):
        module.setup(app)
