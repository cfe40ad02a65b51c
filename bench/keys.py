"""gateway-cold's keys: one organization per request, and a check that none repeats too soon.

A key used again while its organization's facts are still cached would be a cache hit,
so the rotation notes when more keys were handed out within one cache TTL than exist.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence

# ENTITLEMENT_CACHE_TTL_SECONDS' default: how long one organization's facts stay cached.
CACHE_TTL_SECONDS = 30.0


class KeyRotation:
    """Hands out keys in order, wrapping around, and notices reuse within the cache TTL."""

    def __init__(self, tokens: Sequence[str], ttl_seconds: float = CACHE_TTL_SECONDS) -> None:
        """Rotate through ``tokens`` (one per organization)."""
        self.tokens = tokens
        self.ttl_seconds = ttl_seconds
        self.cursor = 0
        self.reused_within_ttl = False
        self._history: deque[tuple[float, int]] = deque()

    def advance(self, used: int) -> None:
        """Note that ``used`` keys were taken from the cursor on."""
        now = time.monotonic()
        self._history.append((now, self.cursor))
        self.cursor += used
        while self._history and self._history[0][0] < now - self.ttl_seconds:
            self._history.popleft()
        if self.cursor - self._history[0][1] > len(self.tokens):
            self.reused_within_ttl = True

    def next_token(self) -> str:
        """The next key, for one request."""
        token = self.tokens[self.cursor % len(self.tokens)]
        self.advance(1)
        return token
