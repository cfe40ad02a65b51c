"""Accepting an invitation: the emailed link `$APP_URL/invitations/{token}` opens here.

    GET  /invitations/{token}          sign in (as the invited address), then one button
    POST /invitations/{token}/accept   join the organization, then its page

Accepting is `POST /api/invitations/{token}/accept`'s function with the signed-in user
in place of a key: the same checks (the address it was sent to, a free seat after the
trial, not expired or revoked), the same refusals, shown in words on the page.
"""

from __future__ import annotations

from aiohttp import web

from gateway.access.auth import hash_token
from gateway.accounts.invitations import MAX_TOKEN_LENGTH, accept_invitation
from gateway.accounts.organizations import membership_changed
from gateway.config import CONFIG
from gateway.pages.organization import organization_path
from gateway.pages.render import form, notify, page, redirect, render, run, signed_in


def token_of(request: web.Request) -> str:
    token = request.match_info["token"]
    return token if len(token) <= MAX_TOKEN_LENGTH else ""


@page
async def invitation_handler(request: web.Request) -> web.StreamResponse:
    """`GET /invitations/{token}`: the invitation's page, once signed in."""
    await signed_in(request)
    return render(request, "invitation.html", {"token": token_of(request)})


@page
async def accept_handler(request: web.Request) -> web.StreamResponse:
    """`POST /invitations/{token}/accept`: join, then the organization's page."""
    token = token_of(request)
    session, _fields = await form(request, f"/invitations/{token}")
    config = request.app[CONFIG]
    membership = await run(request, accept_invitation, hash_token(token), session.user_id, config)
    organization_id = membership["organization_id"]
    membership_changed(request.app, organization_id, session.user_id)
    await notify(request, session, "Welcome: you are now a member of this organization.")
    return redirect(organization_path(organization_id))


def setup(app: web.Application) -> None:
    """Register the invitation pages."""
    app.router.add_get("/invitations/{token}", invitation_handler)
    app.router.add_post("/invitations/{token}/accept", accept_handler)
