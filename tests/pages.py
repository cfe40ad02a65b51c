"""Helpers for the page tests: a browser-like HTTP client that keeps cookies and reads
the forms' CSRF tokens, and the seeding of a signed-in user."""

from __future__ import annotations

import dataclasses
import html
import re
from typing import Any, Protocol

import aiohttp
from yarl import URL

_CSRF = re.compile(r'name="csrf_token" value="([^"]*)"')


@dataclasses.dataclass
class Page:
    """One answer: status, where it ended up, the HTML, the headers."""

    status: int
    url: URL
    text: str
    headers: Any

    @property
    def csrf(self) -> str:
        """The CSRF token of the page's forms (the first one: they are all the same)."""
        found = _CSRF.search(self.text)
        assert found is not None, f"no form with a CSRF token on {self.url}"
        return html.unescape(found.group(1))

    def has(self, text: str) -> bool:
        """True when the page shows `text` (compared unescaped)."""
        return text in html.unescape(self.text)


class Served(Protocol):
    """A running gateway, in this process or another: where it answers."""

    @property
    def url(self) -> URL: ...


class Browser:
    """Cookies and redirects as a browser keeps and follows them (no script)."""

    def __init__(self, gateway: Served) -> None:
        self.gateway = gateway
        # unsafe: cookies for an IP address host (127.0.0.1), which browsers keep too.
        self.session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))

    async def close(self) -> None:
        await self.session.close()

    async def get(self, path: str, **kw: Any) -> Page:
        async with self.session.get(self.gateway.url.with_path(path), **kw) as response:
            return Page(response.status, response.url, await response.text(), response.headers)

    async def post(
        self, path: str, fields: dict[str, str], *, follow: bool = True, **kw: Any
    ) -> Page:
        url = URL(str(self.gateway.url) + path)
        async with self.session.post(url, data=fields, allow_redirects=follow, **kw) as response:
            return Page(response.status, response.url, await response.text(), response.headers)

    async def submit(self, on: Page, action: str, fields: dict[str, str] | None = None) -> Page:
        """Post a form of the page `on`, with its CSRF token, as a click would."""
        return await self.post(action, {"csrf_token": on.csrf, **(fields or {})})

    async def sign_in(self, token: str, next_path: str = "/organizations") -> Page:
        """Sign in with an API key through the sign-in page."""
        login = await self.get("/login")
        assert login.status == 200
        return await self.post(
            "/login/key", {"csrf_token": login.csrf, "api_key": token, "next": next_path}
        )

    def cookie(self, name: str) -> str | None:
        for morsel in self.session.cookie_jar:
            if morsel.key == name:
                return morsel.value
        return None
