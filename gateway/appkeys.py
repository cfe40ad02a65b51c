"""Typed keys for what the application holds (`app[KEY]`) and each request carries."""

from __future__ import annotations

import asyncpg
from aiohttp import web

from gateway.cache import FactsCache
from gateway.config import Config
from gateway.context import RequestContext
from gateway.database import QueryLimiter
from gateway.listener import ChangeListener
from gateway.upstream import UpstreamClient
from gateway.usage import UsageLedger

CONFIG = web.AppKey("config", Config)
POOL = web.AppKey("pool", asyncpg.Pool)
QUERIES = web.AppKey("queries", QueryLimiter)
CACHE = web.AppKey("cache", FactsCache)
UPSTREAM = web.AppKey("upstream", UpstreamClient)
LISTENER = web.AppKey("listener", ChangeListener)
LEDGER = web.AppKey("ledger", UsageLedger)

# The tasks of requests being handled, so that shutdown can wait for them, then cancel.
IN_FLIGHT = web.AppKey("in_flight", set)

CONTEXT = web.RequestKey("context", RequestContext)
