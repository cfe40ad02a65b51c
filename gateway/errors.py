"""The gateway's errors, the reasons they give, and the one JSON envelope they are sent in.

    GatewayError                      any refusal the gateway makes itself
    ├── BadRequest (400)              organization_required, invalid_organization_id, invalid_path,
    │                                 invalid_request, invalid_json, sso_requires_enterprise,
    │                                 invalid_period, invalid_seats, invalid_amount,
    │                                 monthly_plan_unavailable, invalid_signature,
    │                                 invalid_payload, malformed_request
    ├── InvalidApiKey (401)           invalid_api_key
    ├── PaymentRequired (402)         trial_expired, subscription_inactive, seats_exceeded,
    │                                 insufficient_credits, payment_failed
    ├── Forbidden (403)               not_a_member, insufficient_role, invitation_email_mismatch
    ├── NotFound (404)                not_found, endpoint_not_proxied, invitation_not_found,
    │                                 member_not_found
    ├── MethodNotAllowed (405)        method_not_allowed
    ├── RequestTimeout (408)          request_timeout
    ├── Conflict (409)                seats_exhausted, last_owner, already_a_member,
    │                                 subscription_exists, no_billing_account,
    │                                 no_subscription, seats_below_members,
    │                                 subscription_ending
    ├── Gone (410)                    invitation_expired
    ├── PayloadTooLarge (413)         payload_too_large
    ├── InternalError (500)           internal_error
    ├── UpstreamUnreachable (502)     upstream_unreachable
    ├── UpstreamProtocolError (502)   upstream_protocol_error
    ├── BillingProviderError (502)    billing_provider_error
    ├── UpstreamPaymentRequired (503) upstream_payment_required
    ├── DatabaseUnavailable (503)     database_unavailable
    ├── BillingUnavailable (503)      billing_unavailable
    └── UpstreamTimeout (504)         upstream_timeout

Every reason is a member of `Reason`; a test holds it to the README's tables.

The envelope is shaped like OpenRouter's own errors so the Kilo Code extension shows
it as it shows theirs:

    {"error": {"code": 402, "message": "...", "metadata": {"reason": "...", ...}},
     "error_type": "<reason>"}

`render_error` is the one place that turns an error into its status, headers and body;
every server path sends what it returns. Third-party exceptions become these in exactly
three places: `database.py` for asyncpg, `proxy.py` for the upstream client and
`stripe_client.py` for Stripe.
"""

from __future__ import annotations

import dataclasses
import json
from enum import StrEnum
from typing import Any, ClassVar

REQUEST_ID_HEADER = "X-Request-Id"


class Reason(StrEnum):
    """Every machine-readable reason a refusal carries (`error_type`, `metadata.reason`)."""

    # 400
    ORGANIZATION_REQUIRED = "organization_required"
    INVALID_ORGANIZATION_ID = "invalid_organization_id"
    INVALID_PATH = "invalid_path"
    INVALID_REQUEST = "invalid_request"
    INVALID_JSON = "invalid_json"
    SSO_REQUIRES_ENTERPRISE = "sso_requires_enterprise"
    INVALID_PERIOD = "invalid_period"
    INVALID_SEATS = "invalid_seats"
    INVALID_AMOUNT = "invalid_amount"
    MONTHLY_PLAN_UNAVAILABLE = "monthly_plan_unavailable"
    INVALID_SIGNATURE = "invalid_signature"
    INVALID_PAYLOAD = "invalid_payload"
    MALFORMED_REQUEST = "malformed_request"
    # 401
    INVALID_API_KEY = "invalid_api_key"
    # 402: the entitlement rule's refusals
    TRIAL_EXPIRED = "trial_expired"
    SUBSCRIPTION_INACTIVE = "subscription_inactive"
    SEATS_EXCEEDED = "seats_exceeded"
    INSUFFICIENT_CREDITS = "insufficient_credits"
    PAYMENT_FAILED = "payment_failed"
    # 403
    NOT_A_MEMBER = "not_a_member"
    INSUFFICIENT_ROLE = "insufficient_role"
    INVITATION_EMAIL_MISMATCH = "invitation_email_mismatch"
    CSRF_TOKEN_INVALID = "csrf_token_invalid"
    # 404, 405, 408
    NOT_FOUND = "not_found"
    ENDPOINT_NOT_PROXIED = "endpoint_not_proxied"
    INVITATION_NOT_FOUND = "invitation_not_found"
    MEMBER_NOT_FOUND = "member_not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    REQUEST_TIMEOUT = "request_timeout"
    # 409, 410, 413
    SEATS_EXHAUSTED = "seats_exhausted"
    LAST_OWNER = "last_owner"
    ALREADY_A_MEMBER = "already_a_member"
    SUBSCRIPTION_EXISTS = "subscription_exists"
    NO_BILLING_ACCOUNT = "no_billing_account"
    NO_SUBSCRIPTION = "no_subscription"
    SEATS_BELOW_MEMBERS = "seats_below_members"
    SUBSCRIPTION_ENDING = "subscription_ending"
    INVITATION_EXPIRED = "invitation_expired"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    # 5xx
    INTERNAL_ERROR = "internal_error"
    UPSTREAM_UNREACHABLE = "upstream_unreachable"
    UPSTREAM_PROTOCOL_ERROR = "upstream_protocol_error"
    BILLING_PROVIDER_ERROR = "billing_provider_error"
    UPSTREAM_PAYMENT_REQUIRED = "upstream_payment_required"
    DATABASE_UNAVAILABLE = "database_unavailable"
    BILLING_UNAVAILABLE = "billing_unavailable"
    UPSTREAM_TIMEOUT = "upstream_timeout"


class GatewayError(Exception):
    """A refusal with an HTTP status, a machine-readable reason and a human message."""

    status: int = 500
    # None: every refusal of the class names its own reason.
    default_reason: ClassVar[Reason | None] = Reason.INTERNAL_ERROR
    # The connection closes after the answer: what remains of the request is unreadable.
    close_connection: bool = False

    def __init__(
        self,
        message: str,
        *,
        reason: Reason | None = None,
        metadata: dict[str, Any] | None = None,
        fields: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        status: int | None = None,
        close_connection: bool | None = None,
    ) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        if close_connection is not None:
            self.close_connection = close_connection
        self.message = message
        chosen = reason or self.default_reason
        if chosen is None:
            raise TypeError(f"{type(self).__name__} needs a reason")
        self.reason: Reason = chosen
        self.metadata = metadata or {}
        # Extra keys that go inside "error" beside code and message (the 402 dialog's).
        self.fields = fields or {}
        self.headers = headers or {}

    def envelope(self) -> dict[str, Any]:
        """The JSON body sent to the client."""
        return error_envelope(self.status, self.reason, self.message, self.metadata, self.fields)

    def body(self) -> bytes:
        """The envelope, encoded."""
        return json.dumps(self.envelope(), separators=(",", ":")).encode()


@dataclasses.dataclass(frozen=True, slots=True)
class RenderedError:
    """An error as it goes out: status, headers and the encoded envelope."""

    status: int
    headers: dict[str, str]
    body: bytes
    close_connection: bool


def render_error(error: GatewayError, request_id: str | None = None) -> RenderedError:
    """The one rendering of an error, for every server path (aiohttp's and our own)."""
    headers = {**error.headers, "Content-Type": "application/json"}
    if request_id is not None:
        headers[REQUEST_ID_HEADER] = request_id
    return RenderedError(error.status, headers, error.body(), error.close_connection)


def error_envelope(
    status: int,
    reason: str,
    message: str,
    metadata: dict[str, Any] | None = None,
    fields: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the one error envelope; used for every refusal, ours or aiohttp's."""
    error: dict[str, Any] = {"code": status, "message": message}
    error.update(fields or {})
    error["metadata"] = {"reason": reason, **(metadata or {})}
    return {"error": error, "error_type": reason}


class BadRequest(GatewayError):
    status = 400
    default_reason = Reason.INVALID_REQUEST


class InvalidApiKey(GatewayError):
    status = 401
    default_reason = Reason.INVALID_API_KEY


class PaymentRequired(GatewayError):
    status = 402
    default_reason = None


class Forbidden(GatewayError):
    status = 403
    default_reason = Reason.NOT_A_MEMBER


class NotFound(GatewayError):
    status = 404
    default_reason = Reason.NOT_FOUND


class MethodNotAllowed(GatewayError):
    status = 405
    default_reason = Reason.METHOD_NOT_ALLOWED


class Conflict(GatewayError):
    status = 409
    default_reason = None


class Gone(GatewayError):
    status = 410
    default_reason = None


class RequestTimeout(GatewayError):
    """The request's headers or body did not arrive in time."""

    status = 408
    default_reason = Reason.REQUEST_TIMEOUT
    close_connection = True


class PayloadTooLarge(GatewayError):
    status = 413
    default_reason = Reason.PAYLOAD_TOO_LARGE


class InternalError(GatewayError):
    status = 500
    default_reason = Reason.INTERNAL_ERROR


class UpstreamUnreachable(GatewayError):
    status = 502
    default_reason = Reason.UPSTREAM_UNREACHABLE


class UpstreamProtocolError(GatewayError):
    """The upstream's response broke HTTP/1.1: it was dropped, never relayed."""

    status = 502
    default_reason = Reason.UPSTREAM_PROTOCOL_ERROR


class BillingProviderError(GatewayError):
    """Stripe failed or refused a request the gateway made for the caller."""

    status = 502
    default_reason = Reason.BILLING_PROVIDER_ERROR


class BillingUnavailable(GatewayError):
    """Billing cannot be offered: Stripe is not configured (or not set up) on this gateway."""

    status = 503
    default_reason = Reason.BILLING_UNAVAILABLE


class UpstreamPaymentRequired(GatewayError):
    status = 503
    default_reason = Reason.UPSTREAM_PAYMENT_REQUIRED


class DatabaseUnavailable(GatewayError):
    status = 503
    default_reason = Reason.DATABASE_UNAVAILABLE


class UpstreamTimeout(GatewayError):
    status = 504
    default_reason = Reason.UPSTREAM_TIMEOUT


_FOR_STATUS: dict[int, tuple[type[GatewayError], str]] = {
    400: (BadRequest, "The request could not be read as HTTP: check its request line and headers."),
    404: (NotFound, "No such endpoint."),
    405: (MethodNotAllowed, "This endpoint does not accept that method."),
    408: (RequestTimeout, "The request did not arrive in time."),
    413: (PayloadTooLarge, "The request body is larger than the gateway accepts."),
}


def error_for_status(status: int) -> GatewayError:
    """Ours for an HTTP status aiohttp answered with itself (an unreadable request, no
    route, a wrong method, a body too large)."""
    if status >= 500:
        return InternalError("The gateway failed; this is our fault.")
    known = _FOR_STATUS.get(status)
    if known is None:
        return BadRequest("The request was refused.", status=status)
    kind, message = known
    reason = Reason.MALFORMED_REQUEST if kind is BadRequest else None
    return kind(message, reason=reason)
