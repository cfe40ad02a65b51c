"""TTL caches of the facts the proxy path needs, with one query per concurrent miss.

What is cached: API keys by hash, a user's role in an organization, a user's
organizations, and each organization's entitlement facts (never verdicts: the rule runs
on every request against the current time). Entries live `ENTITLEMENT_CACHE_TTL_SECONDS`;
a NOTIFY evicts what it names sooner (see `listener.py`). Unknown tokens are remembered
for `NEGATIVE_CACHE_TTL_SECONDS` so a flood of bad keys cannot flood PostgreSQL.

When PostgreSQL is down, what was cached keeps serving for `STALE_IF_ERROR_SECONDS` past
its TTL (the rule still runs on those facts at the request's instant); what was never
cached gets a 503. When notifications may have been missed, entries are not dropped but
marked for revalidation, so an outage does not empty the cache.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Any, Generic, TypeVar

from aiohttp import web
from cachetools import TTLCache

from gateway.access.queries import ApiKey
from gateway.access.rule import OrgFacts
from gateway.platform.metrics import Tally

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

MISSING: Any = object()
# What the organizations trigger says of an update that moved only credits_used_microdollars
# (the ledger charging a batch); see sql/007_notify_credit_usage.sql.
CREDITS_USED = "credits_used"
DEFAULT_MAXSIZE = 100_000


@dataclasses.dataclass(slots=True)
class _Entry(Generic[V]):
    value: V
    loaded_at: float  # time.monotonic() when read from the database
    # A notification said the row changed: the value is never used again to judge a
    # request, only as the last known one while the database is down.
    changed: bool = False


class Lookup(Generic[K, V]):
    """A TTL cache in front of one loader; concurrent misses for one key share one load.

    `None` from the loader means "does not exist" and is kept for `negative_ttl_seconds`.
    Found values stay `stale_seconds` past their TTL: when a reload fails with one of
    `stale_on` (the database is down), the last known value is served instead of an error.
    A value past its TTL is served while one reload runs behind it, so no request waits
    on a refresh; a value a change notification may have touched (marked for re-reading)
    is served that way only with `revalidate_in_background` (billing facts), and is
    otherwise re-read before use.
    """

    def __init__(
        self,
        load: Callable[[K], Awaitable[V | None]],
        *,
        ttl_seconds: float,
        negative_ttl_seconds: float | None = None,
        stale_seconds: float = 0.0,
        stale_on: tuple[type[BaseException], ...] = (),
        on_stale: Callable[[], None] = lambda: None,
        on_hit: Callable[[], None] = lambda: None,
        on_miss: Callable[[], None] = lambda: None,
        revalidate_in_background: bool = False,
        maxsize: int = DEFAULT_MAXSIZE,
    ) -> None:
        self._load = load
        # Counted by `get` (the metrics' cache hit rate).
        self._on_hit, self._on_miss = on_hit, on_miss
        self._revalidate_in_background = revalidate_in_background
        self._ttl = ttl_seconds
        self._found: TTLCache[K, _Entry[V]] = TTLCache(maxsize, ttl_seconds + stale_seconds)
        self._absent: TTLCache[K, bool] = TTLCache(maxsize, negative_ttl_seconds or ttl_seconds)
        self._stale_on = stale_on
        self._on_stale = on_stale
        # One load per key. An eviction removes the key's load from here: a load that
        # started before the change may have read the old row, so when it finishes it
        # hands its answer to its waiters but does not keep it.
        self._inflight: dict[K, asyncio.Future[V | None]] = {}
        # Loads that were in flight when everything was distrusted (`revalidate_all`):
        # later callers do not join them, but what they read is kept, untrusted, for an
        # outage, unless an eviction names their key meanwhile.
        self._distrusted: dict[K, asyncio.Future[V | None]] = {}
        # Entries read before this instant must be read again before they are trusted.
        self._confirmed_after = float("-inf")

    def cached(self, key: K) -> V | None:
        """The cached value, None when cached as absent, or `MISSING` (the caller loads)."""
        entry = self._found.get(key)
        if entry is not None and not entry.changed:
            confirmed = entry.loaded_at >= self._confirmed_after
            if confirmed and time.monotonic() - entry.loaded_at < self._ttl:
                return entry.value
            # Past its TTL but never contradicted by a notification (a change would have
            # evicted it), or a billing fact: serve it while one refresh runs, so no
            # request waits on a refresh, however slow the database is.
            if confirmed or self._revalidate_in_background:
                self._start_load(key)
                return entry.value
        if key in self._absent:
            return None
        return MISSING

    def is_fresh(self, key: K) -> bool:
        """True when `key` is cached (found or absent) and needs no re-reading."""
        entry = self._found.get(key)
        if entry is not None:
            return (
                not entry.changed
                and entry.loaded_at >= self._confirmed_after
                and time.monotonic() - entry.loaded_at < self._ttl
            )
        return key in self._absent

    async def get(self, key: K) -> V | None:
        """The value for `key`, from the cache or loaded once for all concurrent callers.

        The one way the request path reads the cache (keys, roles, facts), counted."""
        value = self.cached(key)
        if value is not MISSING:
            self._on_hit()
            return value
        self._on_miss()
        return await self.load(key)

    async def load(self, key: K) -> V | None:
        """Load `key`, joining a load already in flight for it.

        The load runs in a task of its own that callers await through a shield, so a
        client that disconnects cancels only its own wait, never the others' answer.
        """
        return await asyncio.shield(self._start_load(key))

    def _start_load(self, key: K) -> asyncio.Future[V | None]:
        """The load in flight for `key`, started now if there is none."""
        pending = self._inflight.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._load_and_store(key))
            # Mark the outcome retrieved: an error nobody awaits is not an unhandled one.
            pending.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._inflight[key] = pending
        return pending

    async def _load_and_store(self, key: K) -> V | None:
        started = time.monotonic()
        current = distrusted = False
        try:
            value = await self._load(key)
        except self._stale_on:
            entry = self._found.get(key)
            if entry is None:
                raise
            self._on_stale()
            return entry.value
        finally:
            # Still the key's registered load: nothing evicted the key meanwhile.
            me = asyncio.current_task()
            current = self._inflight.get(key) is me
            if current:
                del self._inflight[key]
            distrusted = self._distrusted.get(key) is me
            if distrusted:
                del self._distrusted[key]
        if current:
            self._store(key, value)
        elif distrusted and value is not None and self._older_than(key, started):
            # Stamped with its start, before `_confirmed_after`: read again before use.
            self._found[key] = _Entry(value, started)
        return value

    def _older_than(self, key: K, instant: float) -> bool:
        entry = self._found.get(key)
        return entry is None or entry.loaded_at < instant

    def _store(self, key: K, value: V | None) -> None:
        if value is None:
            self._found.pop(key, None)
            self._absent[key] = True
        else:
            self._absent.pop(key, None)
            self._found[key] = _Entry(value, time.monotonic())

    def evict(self, key: K) -> None:
        """Forget `key`, found or absent: it is known to have changed."""
        self._found.pop(key, None)
        self._absent.pop(key, None)
        # Later callers must not join a load that may have read the old row.
        self._forget_loads(key)

    def invalidate(self, key: K) -> None:
        """`key` is out of date in a way that may be served while it is read again (with
        `revalidate_in_background`): the balance after a charge batch."""
        self._forget_loads(key)
        self._absent.pop(key, None)
        entry = self._found.get(key)
        if entry is not None:
            entry.loaded_at = float("-inf")

    def mark_changed(self, key: K) -> None:
        """`key` changed: the next caller reads it again and waits for the answer; the old
        value is kept only for an outage (stale-if-error), never to judge a request."""
        self._forget_loads(key)
        self._absent.pop(key, None)
        entry = self._found.get(key)
        if entry is not None:
            entry.changed = True

    def evict_where(self, predicate: Callable[[K, V], bool]) -> None:
        """Forget every found entry for which `predicate(key, value)` holds."""
        self._forget_all_loads()
        for key in [k for k, e in list(self._found.items()) if predicate(k, e.value)]:
            self._found.pop(key, None)

    def forget_absent(self) -> None:
        """Forget every "does not exist" entry (something was just created)."""
        self._forget_all_loads()
        self._absent.clear()

    def revalidate_all(self) -> None:
        """Distrust everything cached until it is read again, but keep it for outages.

        Used when change notifications may have been missed: an outage then serves the
        last known values (stale-if-error) instead of failing every request.
        """
        self._distrusted.update(self._inflight)
        self._inflight.clear()
        self._absent.clear()
        self._confirmed_after = time.monotonic()

    def clear(self) -> None:
        """Forget everything."""
        self._found.clear()
        self._absent.clear()
        self._forget_all_loads()

    def _forget_loads(self, key: K) -> None:
        """What the loads in flight for `key` read is neither joined nor kept."""
        self._inflight.pop(key, None)
        self._distrusted.pop(key, None)

    def _forget_all_loads(self) -> None:
        self._inflight.clear()
        self._distrusted.clear()

    def __len__(self) -> int:
        return len(self._found) + len(self._absent)


class FactsCache:
    """The four lookups of the proxy path, and how a change notification evicts them."""

    def __init__(
        self,
        *,
        load_key: Callable[[str], Awaitable[ApiKey | None]],
        load_role: Callable[[tuple[str, str]], Awaitable[str | None]],
        load_user_orgs: Callable[[str], Awaitable[tuple[str, ...] | None]],
        load_facts: Callable[[str], Awaitable[OrgFacts | None]],
        ttl_seconds: float,
        negative_ttl_seconds: float,
        stale_seconds: float = 0.0,
        stale_on: tuple[type[BaseException], ...] = (),
        on_stale_facts: Callable[[], None] = lambda: None,
        tally: Tally | None = None,
    ) -> None:
        # Where facts lookups are counted (hits and misses, for the metrics).
        self.tally = tally if tally is not None else Tally()
        common: dict[str, Any] = {
            "ttl_seconds": ttl_seconds,
            "stale_seconds": stale_seconds,
            "stale_on": stale_on,
        }
        self.keys: Lookup[str, ApiKey] = Lookup(
            load_key, negative_ttl_seconds=negative_ttl_seconds, **common
        )
        self.roles: Lookup[tuple[str, str], str] = Lookup(load_role, **common)
        self.user_orgs: Lookup[str, tuple[str, ...]] = Lookup(load_user_orgs, **common)
        # Billing facts change with every charge batch (credits used): serve the last value
        # while one refresh runs, instead of making requests wait on it. Keys and
        # memberships are never served past a change: a revoked key is refused at once.
        self.facts: Lookup[str, OrgFacts] = Lookup(
            load_facts,
            on_stale=on_stale_facts,
            # The entitlement cache's hit rate is the facts' (keys and roles are not counted).
            on_hit=self.tally.cache_hit,
            on_miss=self.tally.cache_miss,
            revalidate_in_background=True,
            **common,
        )

    def apply_change(self, change: dict[str, Any]) -> None:
        """Evict what a `gateway_changes` notification names; clear all when unsure."""
        table = change.get("table")
        org = change.get("organization_id")
        user = change.get("user_id")
        if table == "api_keys" and change.get("key_id"):
            key_id = change["key_id"]
            self.keys.evict_where(lambda _hash, key: key.id == key_id)
            self.keys.forget_absent()
        elif table == "organization_memberships" and org and user:
            self.facts.evict(org)
            self.roles.evict((org, user))
            self.user_orgs.evict(user)
        elif table == "organizations" and org and change.get("change") == CREDITS_USED:
            # The ledger's own charge batch: only the balance moved, and a request judged
            # on a balance a batch old is one the ledger already accounts for.
            self.facts.invalidate(org)
        elif table in ("organizations", "organization_seats_purchases") and org:
            # A purchase, a trial end, require_seats, plan, credits bought: the very next
            # request must be judged on the new row.
            self.facts.mark_changed(org)
        else:
            self.clear()

    def revalidate_organizations(self, organization_ids: Iterable[str]) -> None:
        """Read these organizations' facts again (this process just charged them)."""
        for organization_id in organization_ids:
            self.facts.invalidate(organization_id)

    def revalidate_all(self) -> None:
        """Notifications may have been missed: read everything again before trusting it."""
        for lookup in self._lookups():
            lookup.revalidate_all()

    def clear(self) -> None:
        """Forget everything."""
        for lookup in self._lookups():
            lookup.clear()

    def _lookups(self) -> tuple[Lookup[Any, Any], ...]:
        return (self.keys, self.roles, self.user_orgs, self.facts)


CACHE = web.AppKey("cache", FactsCache)
