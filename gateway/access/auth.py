"""Who is calling, and for which organization: bearer token → key → user → organization.

Tokens are never stored or compared in clear: the key is found by the SHA-256 of the
whole token, which is what `api_keys.key_hash` holds.
"""

from __future__ import annotations

import hashlib
import re
from typing import NamedTuple

from multidict import CIMultiDictProxy

from gateway.access.cache import FactsCache
from gateway.access.queries import ApiKey
from gateway.common.context import RequestContext
from gateway.errors import BadRequest, Forbidden, InvalidApiKey, Reason

ORGANIZATION_HEADER = "X-KiloCode-OrganizationId"
BILLING_MANAGER = "billing_manager"
# Said to a user of several organizations whose key is bound to none: in words of the
# clients they use, which set the header for them.
CHOOSE_ORGANIZATION = (
    "In the Kilo CLI set KILO_ORG_ID to the organization's id; in the Kilo Code extension"
    " pick it in the organization picker; other clients send its id in the"
    f" {ORGANIZATION_HEADER} header."
)
# Longer than any token we issue; bounds the work a hostile header can cause.
MAX_TOKEN_LENGTH = 512
# The canonical 8-4-4-4-12 form only; uuid.UUID() also takes braces, URNs and stray dashes.
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


class Caller(NamedTuple):
    """An authenticated user acting for an organization they are a member of.

    This and the request path's other per-request values are named tuples: a frozen
    dataclass costs about a microsecond to build, a tuple a tenth of that."""

    user_id: str
    organization_id: str
    role: str


def hash_token(token: str) -> str:
    """The lowercase hex SHA-256 of the whole bearer token, as stored in `key_hash`."""
    return hashlib.sha256(token.encode()).hexdigest()


def bearer_token(headers: CIMultiDictProxy[str]) -> str:
    """The token of `Authorization: Bearer <token>`, or 401."""
    values = headers.getall("Authorization", ())
    if not values:
        raise InvalidApiKey("Missing API key: send it as 'Authorization: Bearer <key>'.")
    if len(values) > 1:
        # Which one a proxy in front would pick is anyone's guess: accept neither.
        raise InvalidApiKey("Send exactly one Authorization header.")
    scheme, _, token = values[0].partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise InvalidApiKey("Malformed Authorization header: expected 'Bearer <key>'.")
    if len(token) > MAX_TOKEN_LENGTH or not (token.isascii() and token.isprintable()):
        # Tokens we issue are printable ASCII; anything else (even bytes that are not
        # UTF-8) is no key of ours, and is refused before hashing or a query.
        raise InvalidApiKey("Invalid API key.")
    return token


async def authenticate(headers: CIMultiDictProxy[str], cache: FactsCache) -> ApiKey:
    """The live API key presented in the headers, or 401."""
    key_hash = hash_token(bearer_token(headers))
    key = await cache.keys.get(key_hash)
    if key is None:
        raise InvalidApiKey("Invalid or revoked API key.")
    return key


def canonical_id(value: str) -> str | None:
    """A UUID written in its canonical 8-4-4-4-12 form, lowercased; else None."""
    return value.lower() if _UUID.fullmatch(value) is not None else None


def parse_organization_id(value: str, source: str = f"The {ORGANIZATION_HEADER} header") -> str:
    """The canonical form of an organization id from a header or path, or 400."""
    organization_id = canonical_id(value)
    if organization_id is None:
        raise BadRequest(
            f"{source} must be an organization id (a UUID).", reason=Reason.INVALID_ORGANIZATION_ID
        )
    return organization_id


def refuse_other_organizations(key: ApiKey, organization_id: str) -> None:
    """A key bound to an organization acts for that one only; else 403."""
    if key.organization_id is not None and key.organization_id != organization_id:
        raise Forbidden("This API key belongs to another organization.", reason=Reason.NOT_A_MEMBER)


async def resolve_organization(
    headers: CIMultiDictProxy[str], key: ApiKey, cache: FactsCache
) -> str:
    """The organization the request is for: header, else the key's, else the user's only one."""
    values = headers.getall(ORGANIZATION_HEADER, ())
    if len(values) > 1:
        raise BadRequest(
            f"Send exactly one {ORGANIZATION_HEADER} header.", reason=Reason.INVALID_ORGANIZATION_ID
        )
    header = values[0] if values else None
    if header is not None and header.strip():
        organization_id = parse_organization_id(header.strip())
        refuse_other_organizations(key, organization_id)
        return organization_id
    if key.organization_id is not None:
        return key.organization_id
    organizations = await cache.user_orgs.get(key.user_id) or ()
    if len(organizations) == 1:
        return organizations[0]
    if organizations:
        message = f"You belong to several organizations: choose one. {CHOOSE_ORGANIZATION}"
    else:
        message = (
            "Your account belongs to no organization yet: create one, or accept an"
            " invitation to one."
        )
    raise BadRequest(message, reason=Reason.ORGANIZATION_REQUIRED)


async def identify(
    headers: CIMultiDictProxy[str], cache: FactsCache, ctx: RequestContext
) -> Caller:
    """Who calls for which organization, as a member who may use its models: key, then
    organization, then role, each recorded in the request's context as soon as known
    (the log line names them even when the next step refuses); 401/400/403 otherwise."""
    key = await authenticate(headers, cache)
    ctx.user_id = key.user_id
    organization_id = await resolve_organization(headers, key, cache)
    ctx.organization_id = organization_id
    role = await cache.roles.get((organization_id, key.user_id))
    if role is None or role == BILLING_MANAGER:
        # Billing managers pay for an organization; they do not use its models.
        raise Forbidden("You are not a member of this organization.", reason=Reason.NOT_A_MEMBER)
    return Caller(key.user_id, organization_id, role)


async def require_role(
    key: ApiKey, organization_id: str, cache: FactsCache, roles: frozenset[str]
) -> str:
    """The key's user's role in the organization when it is one of `roles`, else 403."""
    refuse_other_organizations(key, organization_id)
    return await require_user_role(key.user_id, organization_id, cache, roles)


async def require_user_role(
    user_id: str, organization_id: str, cache: FactsCache, roles: frozenset[str]
) -> str:
    """The user's role in the organization when it is one of `roles`, else 403 (a signed-in
    browser is a user, with no key to be bound)."""
    role = await cache.roles.get((organization_id, user_id))
    if role is None:
        raise Forbidden("You are not a member of this organization.", reason=Reason.NOT_A_MEMBER)
    if role not in roles:
        allowed = " or ".join(sorted(r.replace("_", " ") + "s" for r in roles))
        raise Forbidden(
            f"Only {allowed} of this organization may do this.", reason=Reason.INSUFFICIENT_ROLE
        )
    return role
