"""Signing in to the pages, and out: by a one-time link sent by email, or by a Kilo API key.

    GET  /login                 the two ways in
    POST /login/email           a link to the address's user, through the outbox
    GET  /login/link/{token}    the link's page: one button that signs in
    POST /login/link            the link used (once), a session opened
    POST /login/key             a session for the key's user
    POST /logout                the session closed

The link's page asks for a click rather than signing in on the GET: mail scanners open
links to check them, and would use the one-time link up before its owner. Whether an
address has an account is never said (the same page either way), so the form cannot be
used to find out who our users are.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from aiohttp import web

from gateway.access.auth import hash_token
from gateway.access.cache import CACHE
from gateway.accounts.emails import queue_email, sign_in_email
from gateway.config import CONFIG, Config
from gateway.errors import BadRequest, Forbidden, InvalidApiKey, Reason
from gateway.pages.render import current_session, page, redirect, render, run
from gateway.pages.sessions import (
    COOKIE,
    LOGIN_CSRF_COOKIE,
    close_session,
    create_sign_in_link,
    login_form_accepted,
    new_token,
    open_session,
    set_login_csrf_cookie,
    set_session_cookie,
    usable_token,
    use_sign_in_link,
)

MAX_EMAIL_LENGTH = 320
HOME = "/organizations"


def safe_next(value: str | None) -> str:
    """Where to go after signing in: a path on this site only (never `//elsewhere`)."""
    if not value or not value.startswith("/") or value.startswith(("//", "/\\")):
        return HOME
    return value if value.isascii() and value.isprintable() else HOME


def ttl_seconds(config: Config) -> float:
    return config.session_ttl_hours * 3600


def login_page(request: web.Request, status: int = 200, **context: Any) -> web.Response:
    """The sign-in page, with a fresh double-submit value for its forms."""
    csrf = new_token()
    full = {"next": safe_next(request.query.get("next")), "error": None, "login_csrf": csrf}
    response = render(request, "login.html", {**full, **context}, status=status)
    set_login_csrf_cookie(response, request, csrf)
    return response


@page
async def login_handler(request: web.Request) -> web.StreamResponse:
    """`GET /login`: the sign-in page; a signed-in browser goes on to its organizations."""
    if await current_session(request, take_notice=False) is not None:
        return redirect(safe_next(request.query.get("next")))
    return login_page(request)


async def sign_in_fields(request: web.Request) -> Any:
    """A sign-in form's fields, once it repeats its cookie's value."""
    fields = await request.post()
    if not login_form_accepted(request, fields.get("csrf_token")):
        raise Forbidden(
            "This sign-in form has expired: reload the page and try again.",
            reason=Reason.CSRF_TOKEN_INVALID,
        )
    return fields


def signed_in_response(request: web.Request, token: str, next_path: str) -> web.Response:
    response = redirect(safe_next(next_path))
    set_session_cookie(response, request, token, ttl_seconds(request.app[CONFIG]))
    response.del_cookie(LOGIN_CSRF_COOKIE, path="/login")
    return response


@page
async def email_handler(request: web.Request) -> web.StreamResponse:
    """`POST /login/email`: send a one-time link to the address, if it is a user's."""
    fields = await sign_in_fields(request)
    email = str(fields.get("email", "")).strip()
    if not email or "@" not in email or len(email) > MAX_EMAIL_LENGTH or not email.isprintable():
        error = BadRequest("Enter the email address of your Kilo Code account.")
        return login_page(request, status=error.status, error=error.message)
    config = request.app[CONFIG]
    next_path = safe_next(str(fields.get("next", "")))
    await run(request, send_sign_in_link, email, next_path, config)
    return render(request, "login_sent.html", {"email": email})


async def send_sign_in_link(conn: Any, email: str, next_path: str, config: Config) -> None:
    """Store a link for the address's user and queue its email, together; nothing for an
    address no user has."""
    async with conn.transaction():
        created = await create_sign_in_link(conn, email, config.sign_in_link_ttl_minutes * 60)
        if created is None:
            return
        token, address = created
        link = f"{config.app_url}/login/link/{token}"
        if next_path != HOME:
            link += f"?next={quote(next_path, safe='/')}"
        message = sign_in_email(
            to=address, link=link, valid_minutes=config.sign_in_link_ttl_minutes
        )
        await queue_email(conn, message)


@page
async def link_page_handler(request: web.Request) -> web.StreamResponse:
    """`GET /login/link/{token}`: the emailed link's page, with the button that uses it."""
    token = usable_token(request.match_info["token"]) or ""
    return login_page(request, link_token=token)


@page
async def link_handler(request: web.Request) -> web.StreamResponse:
    """`POST /login/link`: sign in with the emailed link, once."""
    fields = await sign_in_fields(request)
    token = usable_token(str(fields.get("token", "")))
    user_id = None if token is None else await run(request, use_sign_in_link, token)
    if user_id is None:
        return login_page(
            request,
            status=401,
            error="This sign-in link has expired or was already used: ask for a new one.",
        )
    return await start_session(request, user_id, str(fields.get("next", "")))


@page
async def key_handler(request: web.Request) -> web.StreamResponse:
    """`POST /login/key`: sign in as the user of a Kilo API key."""
    fields = await sign_in_fields(request)
    token = str(fields.get("api_key", "")).strip()
    key = None
    if usable_token(token) is not None:
        key = await request.app[CACHE].keys.get(hash_token(token))
    if key is None:
        error = InvalidApiKey("That is not a valid Kilo API key, or it was revoked.")
        return login_page(request, status=error.status, error=error.message)
    return await start_session(request, key.user_id, str(fields.get("next", "")))


async def start_session(request: web.Request, user_id: str, next_path: str) -> web.Response:
    ttl = ttl_seconds(request.app[CONFIG])
    token = await run(request, open_session, user_id, ttl)
    return signed_in_response(request, token, next_path)


@page
async def logout_handler(request: web.Request) -> web.StreamResponse:
    """`POST /logout`: close the session (with its CSRF token, so no other site can)."""
    session = await current_session(request, take_notice=False)
    fields = await request.post()
    if session is not None and session.accepts(fields.get("csrf_token")):
        await run(request, close_session, session)
    response = redirect("/login")
    response.del_cookie(COOKIE, path="/")
    return response


def setup(app: web.Application) -> None:
    """Register the sign-in routes."""
    app.router.add_get("/login", login_handler)
    app.router.add_post("/login/email", email_handler)
    app.router.add_get("/login/link/{token}", link_page_handler)
    app.router.add_post("/login/link", link_handler)
    app.router.add_post("/login/key", key_handler)
    app.router.add_post("/logout", logout_handler)
