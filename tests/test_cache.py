"""The facts cache: one load per concurrent miss, TTLs, eviction, and change notifications.

The loaders here are in-memory async callbacks that count their calls (a test double for
the loader argument only); the caches under test are the real `Lookup` and `FactsCache`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable
from typing import Any

import pytest

from gateway.access.cache import MISSING, FactsCache, Lookup
from gateway.access.queries import ApiKey
from gateway.access.rule import OrgFacts

ORG = "11111111-1111-1111-1111-111111111111"
OTHER_ORG = "22222222-2222-2222-2222-222222222222"
USER = "user_a"
OTHER_USER = "user_b"
DEADLINE_SECONDS = 2.0


class CountingLoader:
    """An async loader answering from a dict, counting calls, optionally held at a gate."""

    def __init__(self, values: dict[Hashable, Any] | None = None) -> None:
        self.values: dict[Hashable, Any] = dict(values or {})
        self.calls: list[Hashable] = []
        self.gate: asyncio.Event | None = None
        self.started = asyncio.Event()
        self.error: BaseException | None = None

    def hold(self) -> asyncio.Event:
        """Make every load wait until the returned event is set."""
        self.gate = asyncio.Event()
        return self.gate

    async def __call__(self, key: Hashable) -> Any:
        self.calls.append(key)
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return self.values.get(key)


async def wait_until(condition: Callable[[], bool], timeout_seconds: float) -> float:
    """Poll `condition` until it holds; return the seconds it took, or fail at the deadline."""
    started = time.monotonic()
    deadline = started + timeout_seconds
    while not condition():
        assert time.monotonic() < deadline, f"condition not met within {timeout_seconds}s"
        await asyncio.sleep(0.005)
    return time.monotonic() - started


async def started_load(loader: CountingLoader) -> None:
    """Wait (with a deadline) until the loader has been entered."""
    await asyncio.wait_for(loader.started.wait(), DEADLINE_SECONDS)


# --- Lookup -------------------------------------------------------------------------------


async def test_second_get_is_a_hit() -> None:
    """A loaded value is served from the cache: the loader runs once for two gets."""
    loader = CountingLoader({"k": "v"})
    lookup: Lookup[str, str] = Lookup(loader, ttl_seconds=60)

    assert await lookup.get("k") == "v"
    assert await lookup.get("k") == "v"
    assert lookup.cached("k") == "v"
    assert loader.calls == ["k"]


async def test_missing_key_is_not_cached_before_a_get() -> None:
    """`cached` says MISSING for a key never loaded, and does not load it."""
    loader = CountingLoader({"k": "v"})
    lookup: Lookup[str, str] = Lookup(loader, ttl_seconds=60)

    assert lookup.cached("k") is MISSING
    assert loader.calls == []


async def test_concurrent_misses_share_one_load() -> None:
    """50 concurrent gets of a missing key make exactly one load, and all get its value."""
    loader = CountingLoader({"k": "v"})
    gate = loader.hold()
    lookup: Lookup[str, str] = Lookup(loader, ttl_seconds=60)

    tasks = [asyncio.create_task(lookup.get("k")) for _ in range(50)]
    await started_load(loader)
    await asyncio.sleep(0)  # let every task reach the in-flight load
    gate.set()
    results = await asyncio.gather(*tasks)

    assert results == ["v"] * 50
    assert loader.calls == ["k"]
    assert lookup.cached("k") == "v"


async def test_concurrent_misses_for_different_keys_load_each() -> None:
    """Concurrent misses for different keys do not share a load."""
    loader = CountingLoader({"a": 1, "b": 2})
    lookup: Lookup[str, int] = Lookup(loader, ttl_seconds=60)

    assert await asyncio.gather(lookup.get("a"), lookup.get("b"), lookup.get("a")) == [1, 2, 1]
    assert sorted(map(str, loader.calls)) == ["a", "b"]


async def test_failing_load_reaches_every_waiter_and_is_not_cached() -> None:
    """A load that raises raises in every concurrent waiter, and the next get loads again."""
    loader = CountingLoader({"k": "v"})
    gate = loader.hold()
    loader.error = ConnectionError("database down")
    lookup: Lookup[str, str] = Lookup(loader, ttl_seconds=60)

    tasks = [asyncio.create_task(lookup.get("k")) for _ in range(10)]
    await started_load(loader)
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)

    assert all(isinstance(r, ConnectionError) for r in results), results
    assert loader.calls == ["k"]
    assert lookup.cached("k") is MISSING
    loader.error = None
    assert await lookup.get("k") == "v"
    assert loader.calls == ["k", "k"]


async def test_cancelling_the_first_caller_does_not_cancel_other_waiters() -> None:
    """Cancelling the caller that started a shared load leaves the other waiters its value."""
    # The gateway cancels a handler when its client disconnects; other requests waiting
    # on the same load must not be cancelled with it.
    loader = CountingLoader({"k": "v"})
    gate = loader.hold()
    lookup: Lookup[str, str] = Lookup(loader, ttl_seconds=60)

    first = asyncio.create_task(lookup.get("k"))
    await started_load(loader)
    waiters = [asyncio.create_task(lookup.get("k")) for _ in range(3)]
    await asyncio.sleep(0)  # the waiters join the in-flight load
    first.cancel()
    gate.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)

    assert first.cancelled()
    assert results == ["v"] * 3, results


async def test_none_is_cached_as_absent_for_the_negative_ttl_only() -> None:
    """A None answer is remembered for the negative TTL, then loaded again; values outlive it."""
    loader = CountingLoader({"present": "v"})
    lookup: Lookup[str, str] = Lookup(loader, ttl_seconds=60, negative_ttl_seconds=0.05)

    assert await lookup.get("absent") is None
    assert await lookup.get("present") == "v"
    assert await lookup.get("absent") is None
    assert lookup.cached("absent") is None
    assert loader.calls == ["absent", "present"]

    await wait_until(lambda: lookup.cached("absent") is MISSING, DEADLINE_SECONDS)
    assert lookup.cached("present") == "v"
    loader.values["absent"] = "now here"
    assert await lookup.get("absent") == "now here"
    assert loader.calls == ["absent", "present", "absent"]


async def test_found_values_expire_after_the_ttl() -> None:
    """A found value is loaded again once the positive TTL has passed."""
    loader = CountingLoader({"k": "v1"})
    lookup: Lookup[str, str] = Lookup(loader, ttl_seconds=0.05)

    assert await lookup.get("k") == "v1"
    loader.values["k"] = "v2"
    await wait_until(lambda: lookup.cached("k") is MISSING, DEADLINE_SECONDS)
    assert await lookup.get("k") == "v2"
    assert loader.calls == ["k", "k"]


async def test_past_the_ttl_the_last_value_serves_while_one_refresh_runs() -> None:
    """Within the stale window, an expired value is served at once and re-read behind it."""
    loader = CountingLoader({"k": "v1"})
    lookup: Lookup[str, str] = Lookup(loader, ttl_seconds=0.05, stale_seconds=60)
    assert await lookup.get("k") == "v1"
    await wait_until(lambda: not lookup.is_fresh("k"), DEADLINE_SECONDS)
    loader.values["k"] = "v2"
    gate = loader.hold()
    loader.started.clear()

    # A slow database holds nobody up: both callers get the last value, one load runs.
    assert lookup.cached("k") == "v1"
    assert lookup.cached("k") == "v1"
    await started_load(loader)
    assert lookup.cached("k") == "v1"
    assert loader.calls == ["k", "k"]
    gate.set()
    await wait_until(lambda: lookup.is_fresh("k"), DEADLINE_SECONDS)
    assert lookup.cached("k") == "v2"


async def test_values_notifications_may_have_missed_are_read_again_first() -> None:
    """After revalidate_all, a key lookup waits for a fresh read; billing facts do not."""
    loader = CountingLoader({"k": "v1"})
    keys: Lookup[str, str] = Lookup(loader, ttl_seconds=60, stale_seconds=60)
    facts: Lookup[str, str] = Lookup(
        loader, ttl_seconds=60, stale_seconds=60, revalidate_in_background=True
    )
    assert await keys.get("k") == "v1"
    assert await facts.get("k") == "v1"
    keys.revalidate_all()
    facts.revalidate_all()

    assert keys.cached("k") is MISSING
    assert facts.cached("k") == "v1"


async def test_a_load_across_revalidate_all_is_kept_for_an_outage_but_not_trusted() -> None:
    """The listener connecting while a first load runs (revalidate_all): that read may
    predate a missed change, so it is read again before it judges anyone, but it is what
    an outage right after serves, not a 503 for a key that was just answered."""
    loader = CountingLoader({"k": "v1"})
    keys: Lookup[str, str] = Lookup(
        loader, ttl_seconds=60, stale_seconds=60, stale_on=(ConnectionError,)
    )
    gate = loader.hold()
    first = asyncio.create_task(keys.get("k"))
    await started_load(loader)
    keys.revalidate_all()
    gate.set()
    assert await first == "v1"

    assert keys.cached("k") is MISSING  # not trusted: read again first
    loader.error = ConnectionError("down")
    assert await keys.get("k") == "v1"  # the database is down: the last known value
    assert loader.calls == ["k", "k"]


async def test_an_eviction_during_a_load_across_revalidate_all_keeps_nothing() -> None:
    """A key revoked while its load runs is never served again, not even in an outage."""
    loader = CountingLoader({"k": "v1"})
    keys: Lookup[str, str] = Lookup(
        loader, ttl_seconds=60, stale_seconds=60, stale_on=(ConnectionError,)
    )
    gate = loader.hold()
    first = asyncio.create_task(keys.get("k"))
    await started_load(loader)
    keys.revalidate_all()
    keys.evict("k")
    gate.set()
    assert await first == "v1"

    loader.error = ConnectionError("down")
    with pytest.raises(ConnectionError):
        await keys.get("k")


async def test_a_changed_value_is_read_again_before_it_is_used() -> None:
    """After `mark_changed`, even billing facts (served while refreshing otherwise) are
    read again and the caller waits for the new value: no request sees the old one."""
    loader = CountingLoader({"k": "v1"})
    facts: Lookup[str, str] = Lookup(
        loader, ttl_seconds=60, stale_seconds=60, revalidate_in_background=True
    )
    assert await facts.get("k") == "v1"
    loader.values["k"] = "v2"

    facts.mark_changed("k")

    assert facts.cached("k") is MISSING
    assert not facts.is_fresh("k")
    assert await facts.get("k") == "v2"
    assert facts.cached("k") == "v2"


async def test_a_changed_value_still_serves_when_the_database_is_down() -> None:
    """A changed value is kept for stale-if-error: an outage right after a change serves
    the last known facts instead of failing every request."""
    loader = CountingLoader({"k": "v1"})
    facts: Lookup[str, str] = Lookup(
        loader, ttl_seconds=60, stale_seconds=60, stale_on=(ConnectionError,)
    )
    assert await facts.get("k") == "v1"
    facts.mark_changed("k")
    loader.error = ConnectionError("down")

    assert await facts.get("k") == "v1"


async def test_mark_changed_during_a_load_does_not_keep_the_old_read() -> None:
    """A load that started before the change may have read the old row: its waiters get
    it, but the next caller reads again."""
    loader = CountingLoader({"k": "v1"})
    facts: Lookup[str, str] = Lookup(loader, ttl_seconds=60, revalidate_in_background=True)
    assert await facts.get("k") == "v1"
    facts.mark_changed("k")
    gate = loader.hold()
    loader.started.clear()
    first = asyncio.ensure_future(facts.get("k"))
    await started_load(loader)

    facts.mark_changed("k")
    gate.set()
    assert await first == "v1"
    loader.values["k"] = "v2"

    assert await facts.get("k") == "v2"
    assert loader.calls == ["k", "k", "k"]


async def test_negative_ttl_defaults_to_the_ttl() -> None:
    """Without a negative TTL, absent entries live as long as found ones."""
    loader = CountingLoader()
    lookup: Lookup[str, str] = Lookup(loader, ttl_seconds=60)

    assert await lookup.get("absent") is None
    assert lookup.cached("absent") is None


async def test_evict_forgets_found_and_absent() -> None:
    """`evict` drops a key whether it was cached as found or absent; others stay."""
    loader = CountingLoader({"found": "v", "kept": "w"})
    lookup: Lookup[str, str] = Lookup(loader, ttl_seconds=60)
    await lookup.get("found")
    await lookup.get("kept")
    await lookup.get("absent")

    lookup.evict("found")
    lookup.evict("absent")

    assert lookup.cached("found") is MISSING
    assert lookup.cached("absent") is MISSING
    assert lookup.cached("kept") == "w"
    assert len(lookup) == 1


EVICTIONS: dict[str, Callable[[Lookup[str, Any]], None]] = {
    "evict": lambda lookup: lookup.evict("k"),
    "evict_where": lambda lookup: lookup.evict_where(lambda _k, _v: True),
    "forget_absent": lambda lookup: lookup.forget_absent(),
    "clear": lambda lookup: lookup.clear(),
}


@pytest.mark.parametrize("value", ["v", None], ids=["found", "absent"])
@pytest.mark.parametrize("eviction", list(EVICTIONS))
async def test_eviction_during_a_load_returns_but_does_not_store(
    eviction: str, value: str | None
) -> None:
    """A load in flight when an eviction happens answers its waiters but is not cached."""
    # It may have read the row before the change the eviction stands for.
    loader = CountingLoader({"k": value})
    gate = loader.hold()
    lookup: Lookup[str, Any] = Lookup(loader, ttl_seconds=60)

    first = asyncio.create_task(lookup.get("k"))
    await started_load(loader)
    joined = asyncio.create_task(lookup.get("k"))
    await asyncio.sleep(0)
    EVICTIONS[eviction](lookup)
    gate.set()

    assert await asyncio.gather(first, joined) == [value, value]
    assert lookup.cached("k") is MISSING
    assert loader.calls == ["k"]
    loader.gate = None
    assert await lookup.get("k") == value
    assert loader.calls == ["k", "k"]


async def test_load_without_eviction_is_stored() -> None:
    """A held load with no eviction meanwhile is stored as usual (the control case)."""
    loader = CountingLoader({"k": "v"})
    gate = loader.hold()
    lookup: Lookup[str, str] = Lookup(loader, ttl_seconds=60)

    task = asyncio.create_task(lookup.get("k"))
    await started_load(loader)
    gate.set()

    assert await task == "v"
    assert lookup.cached("k") == "v"


async def test_evict_where_only_drops_matching_found_entries() -> None:
    """`evict_where` drops the found entries its predicate picks and keeps absent ones."""
    loader = CountingLoader({"a": 1, "b": 2})
    lookup: Lookup[str, int] = Lookup(loader, ttl_seconds=60)
    for key in ("a", "b", "absent"):
        await lookup.get(key)

    lookup.evict_where(lambda _key, value: value == 1)

    assert lookup.cached("a") is MISSING
    assert lookup.cached("b") == 2
    assert lookup.cached("absent") is None


async def test_forget_absent_keeps_found_entries() -> None:
    """`forget_absent` drops every absent entry and nothing else."""
    loader = CountingLoader({"a": 1})
    lookup: Lookup[str, int] = Lookup(loader, ttl_seconds=60)
    for key in ("a", "x", "y"):
        await lookup.get(key)

    lookup.forget_absent()

    assert lookup.cached("a") == 1
    assert lookup.cached("x") is MISSING
    assert lookup.cached("y") is MISSING


# --- FactsCache.apply_change --------------------------------------------------------------

KEY_HASH = "a" * 64
OTHER_KEY_HASH = "b" * 64
UNKNOWN_KEY_HASH = "c" * 64
KEY = ApiKey(id="key-1", user_id=USER, organization_id=ORG)
OTHER_KEY = ApiKey(id="key-2", user_id=OTHER_USER, organization_id=None)


def facts_for(org: str) -> OrgFacts:
    return OrgFacts(
        organization_id=org,
        created_at=0.0,
        free_trial_end_at=None,
        require_seats=True,
        seats_used=1,
    )


# Every entry a populated cache holds, by lookup name and key.
ENTRIES: list[tuple[str, Hashable]] = [
    ("keys", KEY_HASH),
    ("keys", OTHER_KEY_HASH),
    ("keys", UNKNOWN_KEY_HASH),  # cached as absent
    ("roles", (ORG, USER)),
    ("roles", (ORG, OTHER_USER)),
    ("roles", (OTHER_ORG, USER)),
    ("user_orgs", USER),
    ("user_orgs", OTHER_USER),
    ("facts", ORG),
    ("facts", OTHER_ORG),
]


async def populated_cache() -> FactsCache:
    """A cache holding every entry in ENTRIES."""
    cache = FactsCache(
        load_key=CountingLoader({KEY_HASH: KEY, OTHER_KEY_HASH: OTHER_KEY}),
        load_role=CountingLoader(
            {(ORG, USER): "owner", (ORG, OTHER_USER): "member", (OTHER_ORG, USER): "member"}
        ),
        load_user_orgs=CountingLoader({USER: (ORG, OTHER_ORG), OTHER_USER: (ORG,)}),
        load_facts=CountingLoader({ORG: facts_for(ORG), OTHER_ORG: facts_for(OTHER_ORG)}),
        ttl_seconds=60,
        negative_ttl_seconds=60,
    )
    for name, key in ENTRIES:
        await getattr(cache, name).get(key)
    assert cached_entries(cache) == set(ENTRIES)
    return cache


def cached_entries(cache: FactsCache) -> set[tuple[str, Hashable]]:
    """Which of ENTRIES the cache still trusts (found or absent, no re-reading due)."""
    return {(name, key) for name, key in ENTRIES if getattr(cache, name).is_fresh(key)}


CHANGES: list[tuple[str, dict[str, Any], set[tuple[str, Hashable]]]] = [
    (
        "organization",
        {"table": "organizations", "organization_id": ORG},
        {("facts", ORG)},
    ),
    (
        "purchase",
        {"table": "organization_seats_purchases", "organization_id": ORG},
        {("facts", ORG)},
    ),
    (
        "credits_used",
        {"table": "organizations", "organization_id": ORG, "change": "credits_used"},
        {("facts", ORG)},
    ),
    (
        "membership",
        {"table": "organization_memberships", "organization_id": ORG, "user_id": USER},
        {("facts", ORG), ("roles", (ORG, USER)), ("user_orgs", USER)},
    ),
    (
        "api_key",
        {"table": "api_keys", "key_id": KEY.id, "user_id": USER, "organization_id": ORG},
        {("keys", KEY_HASH), ("keys", UNKNOWN_KEY_HASH)},
    ),
    (
        "api_key_without_org",
        {"table": "api_keys", "key_id": OTHER_KEY.id, "user_id": OTHER_USER},
        {("keys", OTHER_KEY_HASH), ("keys", UNKNOWN_KEY_HASH)},
    ),
    (
        "api_key_not_cached",
        {"table": "api_keys", "key_id": "key-new", "user_id": USER},
        {("keys", UNKNOWN_KEY_HASH)},
    ),
]


@pytest.mark.parametrize(
    ("change", "evicted"), [(c, e) for _, c, e in CHANGES], ids=[i for i, _, _ in CHANGES]
)
async def test_change_evicts_exactly_what_it_names(
    change: dict[str, Any], evicted: set[tuple[str, Hashable]]
) -> None:
    """Each notification evicts the entries it names, and only those."""
    cache = await populated_cache()

    cache.apply_change(change)

    assert cached_entries(cache) == set(ENTRIES) - evicted


UNCLEAR_CHANGES: list[dict[str, Any]] = [
    {},
    {"table": "something_else", "organization_id": ORG},
    {"table": "organizations"},
    {"table": "organization_seats_purchases", "organization_id": None},
    {"table": "organization_memberships", "organization_id": ORG},
    {"table": "organization_memberships", "user_id": USER},
    {"table": "api_keys", "user_id": USER, "organization_id": ORG},
    {"organization_id": ORG, "user_id": USER},
]


@pytest.mark.parametrize("change", UNCLEAR_CHANGES, ids=repr)
async def test_unknown_or_malformed_change_clears_everything(change: dict[str, Any]) -> None:
    """A notification the cache cannot read clears every lookup, found and absent."""
    cache = await populated_cache()

    cache.apply_change(change)

    assert cached_entries(cache) == set()


CHANGES_JUDGED_AT_ONCE = [
    {"table": "organizations", "organization_id": ORG},
    {"table": "organization_seats_purchases", "organization_id": ORG},
    {"table": "organization_memberships", "organization_id": ORG, "user_id": USER},
]


@pytest.mark.parametrize("change", CHANGES_JUDGED_AT_ONCE, ids=lambda c: c["table"])
async def test_a_change_that_can_turn_a_verdict_is_never_served_stale(
    change: dict[str, Any],
) -> None:
    """After a purchase, an organization or a membership change, the facts are not
    served while they are read again: the next caller gets the new row."""
    cache = await populated_cache()

    cache.apply_change(change)

    assert cache.facts.cached(ORG) is MISSING


async def test_the_ledgers_own_charges_are_served_while_refreshing() -> None:
    """An update that moved only credits_used (a charge batch) keeps serving the cached
    facts while one reload runs: no request waits on a charge batch."""
    cache = await populated_cache()

    cache.apply_change({"table": "organizations", "organization_id": ORG, "change": "credits_used"})

    assert cache.facts.cached(ORG) == facts_for(ORG)


async def test_clear_forgets_every_lookup() -> None:
    """`clear` (what a listener reconnect calls) empties all four lookups."""
    cache = await populated_cache()

    cache.clear()

    assert cached_entries(cache) == set()
    assert [len(lookup) for lookup in (cache.keys, cache.roles, cache.user_orgs, cache.facts)] == [
        0,
        0,
        0,
        0,
    ]
