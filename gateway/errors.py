"""The gateway's errors, and the one JSON envelope every refusal is sent in.

    GatewayError                      any refusal the gateway makes itself
    ├── BadRequest (400)              organization_required, invalid_organization_id, invalid_path,
    │                                 invalid_request, invalid_json, sso_requires_enterprise
    ├── InvalidApiKey (401)           invalid_api_key
    ├── Forbidden (403)               not_a_member, insufficient_role, invitation_email_mismatch
    ├── NotFound (404)                not_found, invitation_not_found, member_not_found
    ├── MethodNotAllowed (405)        method_not_allowed
    ├── Conflict (409)                seats_exhausted, last_owner, already_a_member
    ├── Gone (410)                    invitation_expired
    ├── PaymentRequired (402)         trial_expired, subscription_inactive, seats_exceeded
    ├── RequestTimeout (408)          request_timeout
    ├── PayloadTooLarge (413)         payload_too_large
    ├── UpstreamUnreachable (502)     upstream_unreachable
    ├── UpstreamProtocolError (502)   upstream_protocol_error
    ├── BillingProviderError (502)    billing_provider_error
    ├── UpstreamPaymentRequired (503) upstream_payment_required
    ├── DatabaseUnavailable (503)     database_unavailable
    ├── BillingUnavailable (503)      billing_unavailable
    ├── UpstreamTimeout (504)         upstream_timeout
    └── InternalError (500)           internal_error

The envelope is shaped like OpenRouter's own errors so the Kilo Code extension shows
it as it shows theirs:

    {"error": {"code": 402, "message": "...", "metadata": {"reason": "...", ...}},
     "error_type": "<reason>"}

Third-party exceptions become these in exactly three places: `database.py` for asyncpg,
`proxy.py` for the upstream client and `stripe_client.py` for Stripe; `middleware.py`
maps the tree to HTTP.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar


class GatewayError(Exception):
    """A refusal with an HTTP status, a machine-readable reason and a human message."""

    status: int = 500
    default_reason: ClassVar[str] = "internal_error"
    # The connection closes after the answer: what remains of the request is unreadable.
    close_connection: bool = False

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
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
        self.reason = reason or self.default_reason
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
    default_reason = "invalid_request"


class InvalidApiKey(GatewayError):
    status = 401
    default_reason = "invalid_api_key"


class PaymentRequired(GatewayError):
    status = 402
    default_reason = "payment_required"


class Forbidden(GatewayError):
    status = 403
    default_reason = "not_a_member"


class NotFound(GatewayError):
    status = 404
    default_reason = "not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    default_reason = "method_not_allowed"


class Conflict(GatewayError):
    status = 409
    default_reason = "conflict"


class Gone(GatewayError):
    status = 410
    default_reason = "gone"


class RequestTimeout(GatewayError):
    """The request's headers or body did not arrive in time."""

    status = 408
    default_reason = "request_timeout"
    close_connection = True


class PayloadTooLarge(GatewayError):
    status = 413
    default_reason = "payload_too_large"


class InternalError(GatewayError):
    status = 500
    default_reason = "internal_error"


class UpstreamUnreachable(GatewayError):
    status = 502
    default_reason = "upstream_unreachable"


class UpstreamProtocolError(GatewayError):
    """The upstream's response broke HTTP/1.1: it was dropped, never relayed."""

    status = 502
    default_reason = "upstream_protocol_error"


class BillingProviderError(GatewayError):
    """Stripe failed or refused a request the gateway made for the caller."""

    status = 502
    default_reason = "billing_provider_error"


class BillingUnavailable(GatewayError):
    """Billing cannot be offered: Stripe is not configured (or not set up) on this gateway."""

    status = 503
    default_reason = "billing_unavailable"


class UpstreamPaymentRequired(GatewayError):
    status = 503
    default_reason = "upstream_payment_required"


class DatabaseUnavailable(GatewayError):
    status = 503
    default_reason = "database_unavailable"


class UpstreamTimeout(GatewayError):
    status = 504
    default_reason = "upstream_timeout"
