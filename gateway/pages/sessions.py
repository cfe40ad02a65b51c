"""Who is signed in to the pages: sessions and one-time sign-in links, rows in PostgreSQL.

A browser holds a random token in an HttpOnly, SameSite=Lax cookie (Secure when the page
came over HTTPS); the `web_sessions` row holds the token's SHA-256, the user, when it
expires, the CSRF token every form of the session carries, and one notice for the next
page. Sign-in links are `web_sign_in_links` rows the same way: the token goes only in the
email, and works once, before it expires. Signing out deletes the row, so a copied
cookie stops working too.

Before a session exists, the sign-in forms are protected the double-submit way: a random
value in a short-lived cookie, repeated in the form (`LOGIN_CSRF_COOKIE`).
"""

from __future__ import annotations

import dataclasses
import hmac
import secrets

from aiohttp import web

from gateway.access.auth import hash_token
from gateway.access.queries import Queryable

COOKIE = "kilo_session"
LOGIN_CSRF_COOKIE = "kilo_login_csrf"
LOGIN_CSRF_MAX_AGE_SECONDS = 3600
# Longer than any token we issue; a hostile cookie is refused before hashing or a query.
MAX_TOKEN_LENGTH = 128

_OPEN_SQL = """
INSERT INTO web_sessions (id_hash, user_id, csrf_token, expires_at)
VALUES ($1, $2, $3, now() + make_interval(secs => $4))
"""
# Expired rows are of no use to anyone: each sign-in sweeps those of the day before.
_SWEEP_SQL = "DELETE FROM web_sessions WHERE expires_at < now() - interval '1 day'"
# The notice is shown once: a page view takes it (`$2`), a form post leaves it.
_FIND_SQL = """
WITH found AS (
    SELECT id_hash, notice, notice_is_error FROM web_sessions
    WHERE id_hash = $1 AND expires_at > now()
    FOR UPDATE
)
UPDATE web_sessions s
SET notice = CASE WHEN $2 THEN NULL ELSE s.notice END
FROM found, users u
WHERE s.id_hash = found.id_hash AND u.id = s.user_id
RETURNING s.id_hash, s.user_id, u.email, s.csrf_token, found.notice, found.notice_is_error
"""
_NOTICE_SQL = "UPDATE web_sessions SET notice = $2, notice_is_error = $3 WHERE id_hash = $1"
_CLOSE_SQL = "DELETE FROM web_sessions WHERE id_hash = $1"
_USER_BY_EMAIL_SQL = """
SELECT id, email FROM users WHERE lower(email) = lower($1) ORDER BY id LIMIT 1
"""
# Links asked for one user within the last quarter hour: past a few, no more are sent, so
# the form cannot flood someone's inbox.
MAX_RECENT_LINKS = 5
_RECENT_LINKS_SQL = """
SELECT count(*) FROM web_sign_in_links
WHERE user_id = $1 AND created_at > now() - interval '15 minutes'
"""
_LINK_SQL = """
INSERT INTO web_sign_in_links (token_hash, user_id, expires_at)
VALUES ($1, $2, now() + make_interval(secs => $3))
"""
_USE_LINK_SQL = """
UPDATE web_sign_in_links SET used_at = now()
WHERE token_hash = $1 AND used_at IS NULL AND expires_at > now()
RETURNING user_id
"""


@dataclasses.dataclass(frozen=True, slots=True)
class Session:
    """A signed-in browser: its user, its forms' CSRF token, a notice to show once."""

    id_hash: str
    user_id: str
    email: str
    csrf_token: str
    notice: str | None
    notice_is_error: bool

    def accepts(self, csrf_token: object) -> bool:
        """True when a form carries this session's CSRF token."""
        return same_token(csrf_token, self.csrf_token)


def same_token(submitted: object, expected: str | None) -> bool:
    """True when a form's field is the expected token (compared in constant time)."""
    return (
        expected is not None
        and isinstance(submitted, str)
        and hmac.compare_digest(submitted.encode(), expected.encode())
    )


def new_token() -> str:
    """A random token for a cookie, a form or a link (256 bits)."""
    return secrets.token_urlsafe(32)


def usable_token(value: str | None) -> str | None:
    """`value` when it could be a token we issued, else None."""
    if value and len(value) <= MAX_TOKEN_LENGTH and value.isascii() and value.isprintable():
        return value
    return None


async def open_session(conn: Queryable, user_id: str, ttl_seconds: float) -> str:
    """A new session for the user; returns the token for its cookie."""
    token = new_token()
    await conn.execute(_SWEEP_SQL)
    await conn.execute(_OPEN_SQL, hash_token(token), user_id, new_token(), ttl_seconds)
    return token


async def find_session(conn: Queryable, token: str, *, take_notice: bool) -> Session | None:
    """The live session of the cookie's token, or None (unknown, expired, signed out)."""
    row = await conn.fetchrow(_FIND_SQL, hash_token(token), take_notice)
    return None if row is None else Session(**dict(row))


async def leave_notice(conn: Queryable, session: Session, text: str, *, error: bool) -> None:
    """Show `text` on the session's next page."""
    await conn.execute(_NOTICE_SQL, session.id_hash, text, error)


async def close_session(conn: Queryable, session: Session) -> None:
    """Sign out: the session's cookie works no more, wherever it was copied."""
    await conn.execute(_CLOSE_SQL, session.id_hash)


async def create_sign_in_link(
    conn: Queryable, email: str, ttl_seconds: float
) -> tuple[str, str] | None:
    """A one-time sign-in token for the user with this address (in any case), and the
    address as the user has it; None when no user has it, or after `MAX_RECENT_LINKS`."""
    user = await conn.fetchrow(_USER_BY_EMAIL_SQL, email)
    if user is None or await conn.fetchval(_RECENT_LINKS_SQL, user["id"]) >= MAX_RECENT_LINKS:
        return None
    token = new_token()
    await conn.execute(_LINK_SQL, hash_token(token), user["id"], ttl_seconds)
    return token, user["email"]


async def use_sign_in_link(conn: Queryable, token: str) -> str | None:
    """The user the link signs in, marking it used; None when used, expired or unknown."""
    user_id: str | None = await conn.fetchval(_USE_LINK_SQL, hash_token(token))
    return user_id


def served_over_https(request: web.Request) -> bool:
    """True when the browser reached us over HTTPS, directly or through a TLS proxy.

    A forged X-Forwarded-Proto only makes the sender's own cookie Secure."""
    return request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https"


def set_session_cookie(
    response: web.StreamResponse, request: web.Request, token: str, ttl_seconds: float
) -> None:
    """The session's cookie: never readable by scripts, not sent on cross-site posts."""
    response.set_cookie(
        COOKIE,
        token,
        max_age=int(ttl_seconds),
        path="/",
        httponly=True,
        samesite="Lax",
        secure=served_over_https(request),
    )


def set_login_csrf_cookie(response: web.StreamResponse, request: web.Request, value: str) -> None:
    """The sign-in forms' double-submit value, as the session cookie is set."""
    response.set_cookie(
        LOGIN_CSRF_COOKIE,
        value,
        max_age=LOGIN_CSRF_MAX_AGE_SECONDS,
        path="/login",
        httponly=True,
        samesite="Lax",
        secure=served_over_https(request),
    )


def login_form_accepted(request: web.Request, submitted: object) -> bool:
    """True when a sign-in form repeats the value of its cookie (no session yet)."""
    return same_token(submitted, usable_token(request.cookies.get(LOGIN_CSRF_COOKIE)))
