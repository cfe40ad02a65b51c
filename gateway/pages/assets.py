"""The pages' templates and stylesheet, read from the package once, at start-up, off the
event loop, and served from memory.

The application factory does no I/O, and no request reads a file on the loop: Jinja's
own file loader would read each template on first use and stat it on every render, and
aiohttp's static route resolves its folder when it is added.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

HERE = Path(__file__).parent
TEMPLATES_DIR = HERE / "templates"
STYLESHEET = HERE / "static" / "pages.css"
STYLESHEET_PATH = "/static/pages.css"
# The stylesheet, once read; bytes served as they are.
STYLES = web.AppKey("page_styles", bytes)
# Template sources by name, filled at start-up; the Jinja loader reads from this dict.
TEMPLATES = web.AppKey("page_templates", dict)


def setup_assets(app: web.Application) -> None:
    """Jinja2 for the pages (autoescaped; a missing variable is an error, not a blank),
    over templates the `page_assets` context reads at start-up."""
    sources: dict[str, str] = {}
    app[TEMPLATES] = sources
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.DictLoader(sources),
        autoescape=jinja2.select_autoescape(default=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    app.cleanup_ctx.append(page_assets)
    app.router.add_get(STYLESHEET_PATH, stylesheet)


def read_assets() -> tuple[dict[str, str], bytes]:
    """Every template by name, and the stylesheet (blocking: run in a thread)."""
    templates = {p.name: p.read_text("utf-8") for p in TEMPLATES_DIR.glob("*.html")}
    return templates, STYLESHEET.read_bytes()


async def page_assets(app: web.Application) -> AsyncIterator[None]:
    """Read the templates and the stylesheet before the first request."""
    templates, styles = await asyncio.to_thread(read_assets)
    app[TEMPLATES].update(templates)
    app[STYLES] = styles
    yield


async def stylesheet(request: web.Request) -> web.Response:
    """`GET /static/pages.css`."""
    return web.Response(
        body=request.app[STYLES],
        content_type="text/css",
        charset="utf-8",
        headers={"Cache-Control": "public, max-age=300", "X-Content-Type-Options": "nosniff"},
    )
