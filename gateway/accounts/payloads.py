"""Reading JSON request bodies: a clear 400 for anything malformed, never a 500."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from gateway.errors import BadRequest, Reason


async def json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or 400 `invalid_json`."""
    raw = await request.read()
    try:
        # Strict UTF-8 (RFC 8259): json.loads(bytes) would also guess UTF-16/32 and let
        # encoded surrogates through. Too deep a nesting is malformed too, not a crash.
        body = json.loads(raw.decode("utf-8")) if raw else {}
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadRequest(
            "The request body is not valid JSON.", reason=Reason.INVALID_JSON
        ) from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.", reason=Reason.INVALID_JSON)
    return body


def string_field(body: dict[str, Any], name: str, *, max_length: int = 200) -> str:
    """A required, non-empty string field, stripped; 400 `invalid_request` otherwise."""
    value = body.get(name)
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f"'{name}' is required and must be a non-empty string.")
    require_storable(value, name)
    value = value.strip()
    if len(value) > max_length:
        raise BadRequest(f"'{name}' must be at most {max_length} characters.")
    return value


def require_storable(value: str, name: str) -> None:
    """400 for text PostgreSQL cannot store: NUL, or a lone surrogate (valid JSON escapes)."""
    if "\x00" in value or any("\ud800" <= ch <= "\udfff" for ch in value):
        raise BadRequest(f"'{name}' contains characters that are not allowed.")


def choice_field(body: dict[str, Any], name: str, choices: tuple[str, ...], default: str) -> str:
    """A string field that must be one of `choices` (default when absent)."""
    value = body.get(name, default)
    if value not in choices:
        raise BadRequest(f"'{name}' must be one of: {', '.join(choices)}.")
    return str(value)
