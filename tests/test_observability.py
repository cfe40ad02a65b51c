"""What operators see: health checks, Prometheus metrics and the one log line per request.

Prometheus metrics are process-global, so metric tests compare values before and after
their own requests. The gateway counts and logs a request as its handler finishes, which
can be just after the client has the last byte, so both are polled with a deadline.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from typing import Any

import aiohttp
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from bench.fake_upstream import RunningUpstream
from gateway.access.auth import hash_token
from gateway.platform import metrics
from tests.conftest import UPSTREAM_TEST_KEY, RunningGateway
from tests.factories import Seed

CHAT_ROUTE = "/api/openrouter/chat/completions"
CHAT_BODY: dict[str, Any] = {
    "model": "openai/gpt-4o-mini",
    "messages": [{"role": "user", "content": "hello"}],
}
EXPIRED_AGE_DAYS = 31
DEADLINE_SECONDS = 2.0

Labels = Mapping[str, str]


async def member_token(seed: Seed, *, age_days: float = 1) -> tuple[str, str, str]:
    """(org_id, user_id, token) for the owner of a new organization created `age_days` ago."""
    org_id = await seed.org(age=timedelta(days=age_days))
    user_id, token = await seed.member_with_key(org_id)
    return org_id, user_id, token


async def send(
    client: aiohttp.ClientSession,
    gateway: RunningGateway,
    path: str = CHAT_ROUTE,
    *,
    token: str | None = None,
    method: str = "POST",
) -> tuple[int, str, bytes]:
    """Send one request; return its status, X-Request-Id and the raw response (head and body)."""
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    body = CHAT_BODY if method == "POST" else None
    async with client.request(method, str(gateway.url) + path, json=body, headers=headers) as r:
        raw_head = "".join(f"{k}: {v}\n" for k, v in r.headers.items()).encode()
        return r.status, r.headers["X-Request-Id"], raw_head + await r.read()


async def scrape(client: aiohttp.ClientSession, gateway: RunningGateway) -> str:
    """The gateway's /metrics text."""
    async with client.get(str(gateway.url) + "/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


def value(text: str, sample_name: str, labels: Labels | None = None) -> float:
    """Sum of the samples named `sample_name` whose labels include `labels` (0 if none)."""
    wanted = dict(labels or {})
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name and wanted.items() <= sample.labels.items():
                total += sample.value
    return total


async def wait_for_delta(
    client: aiohttp.ClientSession,
    gateway: RunningGateway,
    before: str,
    expected: Mapping[tuple[str, tuple[tuple[str, str], ...]], float],
) -> str:
    """Poll /metrics until every (sample, labels) grew by exactly its delta; return the text."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        text = await scrape(client, gateway)
        deltas = {
            key: value(text, key[0], dict(key[1])) - value(before, key[0], dict(key[1]))
            for key in expected
        }
        if deltas == dict(expected):
            return text
        assert time.monotonic() < deadline, f"metric deltas {deltas} != {dict(expected)}"
        await asyncio.sleep(0.02)


def metric(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """A key for `wait_for_delta`."""
    return name, tuple(sorted(labels.items()))


def request_lines(log_stream: io.StringIO) -> list[dict[str, Any]]:
    """Every canonical request log line written so far."""
    lines = [json.loads(line) for line in log_stream.getvalue().splitlines() if line[:1] == "{"]
    return [line for line in lines if line.get("event") == "request"]


async def wait_for_log_lines(
    log_stream: io.StringIO, request_ids: list[str]
) -> dict[str, list[dict[str, Any]]]:
    """Poll the log until each request id has a request line; return lines by request id."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        by_id: dict[str, list[dict[str, Any]]] = {rid: [] for rid in request_ids}
        for line in request_lines(log_stream):
            if line.get("request_id") in by_id:
                by_id[line["request_id"]].append(line)
        if all(by_id.values()):
            return by_id
        assert time.monotonic() < deadline, f"no request log line for some of {request_ids}"
        await asyncio.sleep(0.02)


# --- Health -------------------------------------------------------------------------------


async def test_healthz_is_200(gateway: RunningGateway, client: aiohttp.ClientSession) -> None:
    """/healthz answers 200 while the process serves."""
    async with client.get(str(gateway.url) + "/healthz") as resp:
        assert resp.status == 200


async def test_readyz_is_200_with_database_up(
    gateway: RunningGateway, client: aiohttp.ClientSession
) -> None:
    """/readyz answers 200 and reports the database up when PostgreSQL answers."""
    async with client.get(str(gateway.url) + "/readyz") as resp:
        assert resp.status == 200
        assert (await resp.json())["database"] == "up"


# --- Metrics ------------------------------------------------------------------------------


async def test_requests_are_counted_by_route_method_status(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """gateway_requests_total counts each request under its route template, method and status."""
    _org, _user, token = await member_token(seed)
    before = await scrape(client, gateway)
    await send(client, gateway, token=token)
    await send(client, gateway, token=None)
    await wait_for_delta(
        client,
        gateway,
        before,
        {
            metric("gateway_requests_total", route=CHAT_ROUTE, method="POST", status="200"): 1,
            metric("gateway_requests_total", route=CHAT_ROUTE, method="POST", status="401"): 1,
        },
    )


async def test_blocked_requests_are_counted_by_mode_and_reason(
    gateway: RunningGateway,
    gateway_factory: Callable[..., Awaitable[RunningGateway]],
    client: aiohttp.ClientSession,
    seed: Seed,
) -> None:
    """gateway_blocked_total counts an enforced block as mode=enforce and a shadow one as shadow."""
    shadow = await gateway_factory(ENFORCEMENT_MODE="shadow")
    _org, _user, token = await member_token(seed, age_days=EXPIRED_AGE_DAYS)
    before = await scrape(client, gateway)
    assert (await send(client, gateway, token=token))[0] == 402
    assert (await send(client, shadow, token=token))[0] == 200
    blocked = "gateway_blocked_total"
    await wait_for_delta(
        client,
        gateway,
        before,
        {
            metric(blocked, mode="enforce", reason="trial_expired"): 1,
            metric(blocked, mode="shadow", reason="trial_expired"): 1,
        },
    )


async def test_timings_and_active_streams_are_exported(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """Request duration and upstream TTFB are observed per request; active streams exported."""
    _org, _user, token = await member_token(seed)
    before = await scrape(client, gateway)
    await send(client, gateway, token=token)
    chat_ok = metric("gateway_requests_total", route=CHAT_ROUTE, method="POST", status="200")
    after = await wait_for_delta(
        client, gateway, before, {chat_ok: 1, metric("gateway_upstream_ttfb_seconds_count"): 1}
    )
    duration = "gateway_request_duration_seconds_count"
    # Every scrape is timed too, so the chat request is one of at least two new observations.
    assert value(after, duration) - value(before, duration) >= 2
    assert value(after, "gateway_active_streams") == value(before, "gateway_active_streams")
    assert "\ngateway_active_streams " in after


async def test_request_duration_is_told_apart_by_route_and_status_class(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """A stream and a refusal of the same route land in different duration series, so
    that a fast 401 never hides a slow 200 in the route's latency."""
    _org, _user, token = await member_token(seed)
    before = await scrape(client, gateway)
    assert (await send(client, gateway, token=token))[0] == 200
    assert (await send(client, gateway, token="kilo_not_a_key"))[0] == 401
    count = "gateway_request_duration_seconds_count"
    await wait_for_delta(
        client,
        gateway,
        before,
        {
            metric(count, route=CHAT_ROUTE, status_class="2xx"): 1,
            metric(count, route=CHAT_ROUTE, status_class="4xx"): 1,
        },
    )


async def test_entitlement_cache_hits_and_misses_are_counted(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """The first request for an org is a cache miss and the next one a hit."""
    _org, _user, token = await member_token(seed)
    before = await scrape(client, gateway)
    await send(client, gateway, token=token)
    await send(client, gateway, token=token)
    cache = "gateway_entitlement_cache_total"
    await wait_for_delta(
        client, gateway, before, {metric(cache, result="miss"): 1, metric(cache, result="hit"): 1}
    )


async def test_metric_labels_carry_no_identifiers_or_raw_paths(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """Labels hold route templates only: no org id, user id, token or raw path."""
    org_id, user_id, token = await member_token(seed)
    before = await scrape(client, gateway)
    await send(client, gateway, token=token)
    await send(client, gateway, "/api/openrouter/some/random/id", token=token, method="GET")
    other = metric("gateway_requests_total", route="/api/openrouter/other", method="GET")
    text = await wait_for_delta(client, gateway, before, {other: 1})
    label_values = {
        label
        for family in text_string_to_metric_families(text)
        if family.name.startswith("gateway_")
        for sample in family.samples
        for label in sample.labels.values()
    }
    for secret in (org_id, user_id, token, hash_token(token), "/api/openrouter/some/random/id"):
        assert not any(secret in label for label in label_values), secret
        assert secret not in text


# --- Logs ---------------------------------------------------------------------------------


async def test_one_log_line_per_request(
    gateway: RunningGateway,
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    seed: Seed,
    log_stream: io.StringIO,
) -> None:
    """Each request writes exactly one JSON line with its id, org, user, verdict and timings."""
    org_id, user_id, token = await member_token(seed)
    expired_org, expired_user, expired_token = await member_token(seed, age_days=EXPIRED_AGE_DAYS)
    allowed = await send(client, gateway, token=token)
    blocked = await send(client, gateway, token=expired_token)
    unauthorized = await send(client, gateway, token=None)
    lines = await wait_for_log_lines(log_stream, [allowed[1], blocked[1], unauthorized[1]])
    assert [len(found) for found in lines.values()] == [1, 1, 1]
    expected = {
        allowed[1]: (org_id, user_id, 200, "allowed", None, 200),
        blocked[1]: (expired_org, expired_user, 402, "blocked", "trial_expired", None),
        unauthorized[1]: (None, None, 401, None, "invalid_api_key", None),
    }
    for request_id, (org, user, status, verdict, reason, upstream_status) in expected.items():
        line = lines[request_id][0]
        assert line["route"] == CHAT_ROUTE
        assert (line["organization_id"], line["user_id"]) == (org, user)
        assert (line["status"], line["verdict"], line["reason"]) == (status, verdict, reason)
        assert line["upstream_status"] == upstream_status
        assert isinstance(line["duration_ms"], float | int) and line["duration_ms"] >= 0
    assert lines[allowed[1]][0]["ttfb_ms"] > 0
    assert lines[blocked[1]][0]["ttfb_ms"] is None


async def test_no_secrets_in_logs_or_responses(
    gateway: RunningGateway,
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    seed: Seed,
    log_stream: io.StringIO,
) -> None:
    """Logs never hold a client token, its hash or the upstream key; responses never the key."""
    _org, _user, token = await member_token(seed)
    _expired_org, _expired_user, expired_token = await member_token(seed, age_days=EXPIRED_AGE_DAYS)
    unknown_token = "kilo_unknown-token-nobody-issued-0123456789"
    replies = [
        await send(client, gateway, token=token),
        await send(client, gateway, "/api/openrouter/models", token=token, method="GET"),
        await send(client, gateway, token=expired_token),
        await send(client, gateway, token=unknown_token),
    ]
    for fail_status in (500, 402):
        upstream.settings.fail_status = fail_status
        replies.append(await send(client, gateway, token=token))
    assert [status for status, _id, _raw in replies] == [200, 200, 402, 401, 500, 503]
    await wait_for_log_lines(log_stream, [request_id for _status, request_id, _raw in replies])
    logged = log_stream.getvalue()
    for secret in (token, expired_token, unknown_token, UPSTREAM_TEST_KEY):
        assert secret not in logged
        assert hash_token(secret) not in logged
    for _status, _request_id, raw in replies:
        assert UPSTREAM_TEST_KEY.encode() not in raw


def test_requests_folded_in_slices_are_each_counted_once() -> None:
    """The flusher folds a slice at a time; every request is counted, none twice."""
    tally = metrics.Tally()
    labels = {"route": "/test/fold", "method": "POST", "status": "299"}
    before = REGISTRY.get_sample_value("gateway_requests_total", labels) or 0.0
    by_class = {"route": "/test/fold", "status_class": "2xx"}
    observed = REGISTRY.get_sample_value("gateway_request_duration_seconds_count", by_class) or 0.0
    for _ in range(300):
        tally.request_answered("/test/fold", "POST", 299, 0.001, None)
    slices = 1
    while tally.fold(128):
        slices += 1
    assert slices == 3  # 128 + 128 + 44
    assert REGISTRY.get_sample_value("gateway_requests_total", labels) == before + 300
    assert (
        REGISTRY.get_sample_value("gateway_request_duration_seconds_count", by_class)
        == observed + 300
    )
    assert not tally.fold(128)  # nothing left, nothing counted again
    assert REGISTRY.get_sample_value("gateway_requests_total", labels) == before + 300
