"""How a page goes out: templates, the signed-in session, forms, and errors in plain words.

Every page handler is wrapped by `page`. It turns what the JSON API would answer with the
envelope into something a person reads: a `GatewayError` becomes an error page with the
same status and message (or, after a form post, a notice on the page the form came
from), a missing session a redirect to sign in, and anything unexpected a 500 page that
shows no traceback (the traceback goes to the log, as for the API). The status, reason
and message still come from the one error hierarchy in `gateway/errors.py`.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import aiohttp_jinja2
import structlog
from aiohttp import web
from multidict import MultiDict, MultiDictProxy

from gateway.common.context import CONTEXT
from gateway.config import CONFIG
from gateway.errors import Forbidden, GatewayError, InternalError, Reason
from gateway.pages.sessions import COOKIE, Session, find_session, leave_notice, usable_token
from gateway.platform.database import POOL, run_query

log = structlog.get_logger("gateway.pages")

SESSION = web.RequestKey("session", Session)
# Where a refused form post sends the browser back to (set by `form`).
BACK_TO = web.RequestKey("back_to", str)
PageHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The pages load nothing from elsewhere and run no script; forms post here, and their
# answer may redirect to Stripe (which form-action also governs).
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self' data:; "
        "form-action 'self' https:; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class SignInRequired(Exception):
    """The page needs a signed-in browser: it is sent to the sign-in page, then back to
    `next_path` (a form's post goes back to the page it came from, not to the post)."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


def page(handler: PageHandler) -> PageHandler:
    """`handler`, its refusals and failures shown as pages (see the module docstring)."""

    @functools.wraps(handler)
    async def answer(request: web.Request) -> web.StreamResponse:
        try:
            response = await handler(request)
        except SignInRequired as exc:
            response = redirect(f"/login?next={quote(exc.next_path, safe='/?=&')}")
        except GatewayError as exc:
            response = await refused(request, exc)
        except Exception:
            log.exception("page_failed", route=request[CONTEXT].route)
            response = await refused(request, InternalError("Something went wrong on our side."))
        response.headers.update(SECURITY_HEADERS)
        return response

    return answer


async def refused(request: web.Request, exc: GatewayError) -> web.StreamResponse:
    """After a form: back to its page with the message. Else: the error page."""
    ctx = request[CONTEXT]
    ctx.reason = ctx.reason or exc.reason
    session = request.get(SESSION)
    back = request.get(BACK_TO)
    if request.method == "POST" and session is not None and back is not None:
        try:
            await run(request, leave_notice, session, exc.message, error=True)
            return redirect(back)
        except GatewayError:
            pass  # the database is away: the message goes on an error page instead
    context = {"status": exc.status, "message": exc.message, "reason": exc.reason.value}
    return render(request, "error.html", context, status=exc.status)


def render(
    request: web.Request, template: str, context: dict[str, Any], *, status: int = 200
) -> web.Response:
    """The template rendered with the session (for the header and the forms' CSRF token)."""
    session = request.get(SESSION)
    full = {"session": session, **context}
    response = aiohttp_jinja2.render_template(template, request, full, status=status)
    response.headers.update(SECURITY_HEADERS)
    return response


def redirect(location: str) -> web.Response:
    """See other: the browser GETs `location` (after a form, so a reload posts nothing)."""
    return web.Response(status=303, headers={"Location": location})


async def run(
    request: web.Request, query: Callable[..., Awaitable[Any]], *args: Any, **kw: Any
) -> Any:
    """`query(conn, *args, **kw)` on a pooled connection, with the configured timeout."""
    timeout = request.app[CONFIG].database_query_timeout_seconds
    return await run_query(request.app[POOL], timeout, functools.partial(query, **kw), *args)


async def current_session(request: web.Request, *, take_notice: bool) -> Session | None:
    """The browser's live session, or None; kept on the request for the templates."""
    token = usable_token(request.cookies.get(COOKIE))
    if token is None:
        return None
    session: Session | None = await run(request, find_session, token, take_notice=take_notice)
    if session is not None:
        request[SESSION] = session
        request[CONTEXT].user_id = session.user_id
    return session


async def signed_in(request: web.Request) -> Session:
    """The session of a page view (its notice taken for this page); else to sign-in."""
    session = await current_session(request, take_notice=True)
    if session is None:
        raise SignInRequired(request.path_qs)
    return session


async def form(request: web.Request, back_to: str) -> tuple[Session, MultiDictProxy[str]]:
    """The session and fields of a form post, once its CSRF token is the session's; a
    refusal later in the handler is shown on `back_to`."""
    session = await current_session(request, take_notice=False)
    if session is None:
        raise SignInRequired(back_to)
    fields = await request.post()
    if not session.accepts(fields.get("csrf_token")):
        raise Forbidden(
            "This form has expired or did not come from this site: reload the page and try again.",
            reason=Reason.CSRF_TOKEN_INVALID,
        )
    request[BACK_TO] = back_to
    return session, MultiDictProxy(_text_fields(fields))


def _text_fields(fields: MultiDictProxy[Any]) -> MultiDict[str]:
    """Only the text fields: the pages upload no files."""
    return MultiDict((k, v) for k, v in fields.items() if isinstance(v, str))


async def notify(request: web.Request, session: Session, text: str) -> None:
    """Show `text` on the next page of this session."""
    await run(request, leave_notice, session, text, error=False)
