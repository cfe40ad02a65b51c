"""The parameters Stripe accepts on each endpoint the fake serves, and the unknown one a
request sends, the way Stripe refuses it (`Received unknown parameter: a[b]`).

What is known comes from the stripe library's own request types (`stripe.params`), which
are generated from Stripe's API definition for the version the library pins: the very
version the gateway sends. A misspelled or invented parameter fails a test as it would
fail against Stripe, without a second list here to keep in step.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import sys
from typing import Any

import stripe

# Options the library takes beside the parameters (the key, the version, ...); never sent
# as parameters.
_OPTIONS = frozenset(stripe.RequestOptions.__annotations__)
_NAME = re.compile(r"\b([A-Z][A-Za-z0-9]*Params[A-Za-z0-9]*)\b")
_FREE_KEYS = ("Dict[", "UntypedStripeObject")


@dataclasses.dataclass(frozen=True)
class Shape:
    """What a parameter holds: nested parameters (`fields`), or anything (`fields` None)."""

    fields: dict[str, Shape] | None


ANYTHING = Shape(None)


def _is_params_type(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, dict) and hasattr(value, "__total__")


@functools.cache
def shape_of(params_type: type) -> Shape:
    """The parameters of one of the library's request types, nested ones included."""
    module = sys.modules[params_type.__module__]
    fields: dict[str, Shape] = {}
    for name, annotation in params_type.__annotations__.items():
        if name not in _OPTIONS:
            fields[name] = _field_shape(str(annotation), module)
    return Shape(fields)


def _field_shape(annotation: str, module: Any) -> Shape:
    if any(marker in annotation for marker in _FREE_KEYS):
        return ANYTHING  # metadata and the like: any keys
    for name in _NAME.findall(annotation):
        nested = getattr(module, name, None)
        if _is_params_type(nested):
            return shape_of(nested)
    return ANYTHING


def unknown_parameter(params: dict[str, Any], shape: Shape, prefix: str = "") -> str | None:
    """The first parameter `shape` does not know, bracketed as Stripe names it; or None."""
    if shape.fields is None:
        return None
    for key, value in params.items():
        name = f"{prefix}[{key}]" if prefix else key
        if key not in shape.fields:
            return name
        elements = enumerate(value) if isinstance(value, list) else [(None, value)]
        for index, element in elements:
            if isinstance(element, dict):
                where = name if index is None else f"{name}[{index}]"
                found = unknown_parameter(element, shape.fields[key], where)
                if found is not None:
                    return found
    return None


# The library's request type for each route the fake serves, by method and route.
ENDPOINTS: dict[tuple[str, str], type] = {
    ("POST", "/v1/customers"): stripe.params.CustomerCreateParams,
    ("POST", "/v1/checkout/sessions"): stripe.params.checkout.SessionCreateParams,
    ("POST", "/v1/products"): stripe.params.ProductCreateParams,
    ("GET", "/v1/products"): stripe.params.ProductListParams,
    ("POST", "/v1/prices"): stripe.params.PriceCreateParams,
    ("GET", "/v1/prices"): stripe.params.PriceListParams,
    ("GET", "/v1/subscriptions/{subscription_id}"): stripe.params.SubscriptionRetrieveParams,
    ("POST", "/v1/subscriptions/{subscription_id}"): stripe.params.SubscriptionUpdateParams,
    ("POST", "/v1/subscription_schedules"): stripe.params.SubscriptionScheduleCreateParams,
    ("POST", "/v1/subscription_schedules/{schedule}"): (
        stripe.params.SubscriptionScheduleUpdateParams
    ),
    ("POST", "/v1/subscription_schedules/{schedule}/release"): (
        stripe.params.SubscriptionScheduleReleaseParams
    ),
    ("GET", "/v1/billing_portal/configurations"): (
        stripe.params.billing_portal.ConfigurationListParams
    ),
    ("POST", "/v1/billing_portal/configurations"): (
        stripe.params.billing_portal.ConfigurationCreateParams
    ),
    ("POST", "/v1/billing_portal/configurations/{configuration}"): (
        stripe.params.billing_portal.ConfigurationUpdateParams
    ),
    ("POST", "/v1/billing_portal/sessions"): stripe.params.billing_portal.SessionCreateParams,
}


def refusal(method: str, route: str, params: dict[str, Any]) -> str | None:
    """Stripe's message for the request's unknown parameter, or None when all are known."""
    params_type = ENDPOINTS.get((method, route))
    if params_type is None:
        return None
    found = unknown_parameter(params, shape_of(params_type))
    return None if found is None else f"Received unknown parameter: {found}"
