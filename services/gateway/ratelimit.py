"""Per-key rate limits: a token bucket per API key, in memory (embedded) or in Redis (distributed).

A key limited to ``per_minute`` requests holds at most ``per_minute`` tokens and gains ``per_minute / 60``
a second; each request takes one. :meth:`RateLimiter.acquire` answers 0 when a token was taken, else the
seconds until one will be there (the gateway's ``Retry-After``). ``per_minute`` 0 means no limit.

* :class:`MemoryRateLimiter`: one process (the embedded gateway). Buckets exist only for keys that
  passed authentication, so memory is bounded by the number of keys.
* :class:`RedisRateLimiter`: every gateway replica shares the buckets; one Lua script reads, refills and
  takes a token atomically, on Redis's clock, and lets an idle bucket expire. If Redis cannot be reached
  the request is let through (logged): a limit is protection, not authentication, and the bus is down
  then anyway.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger(__name__)

REDIS_PREFIX = "asyncthink:ratelimit:"


class RateLimiter(Protocol):
    async def acquire(self, key: str, *, per_minute: int) -> float:
        """Take a token for ``key``: 0.0 if there was one, else the seconds until there will be."""
        ...

    async def close(self) -> None: ...


class MemoryRateLimiter:
    """Token buckets in this process's memory."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill)

    async def acquire(self, key: str, *, per_minute: int) -> float:
        if per_minute <= 0:
            return 0.0
        now = self._clock()
        rate = per_minute / 60.0
        tokens, last = self._buckets.get(key, (float(per_minute), now))
        tokens = min(float(per_minute), tokens + (now - last) * rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / rate

    async def close(self) -> None:
        self._buckets.clear()


# KEYS[1] the bucket; ARGV[1] capacity (tokens), ARGV[2] refill rate (tokens per ms). Returns the wait in ms.
_TOKEN_BUCKET = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or capacity
local ts = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - ts) * rate)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = math.ceil((1 - tokens) / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / rate) + 1000)
return wait
"""


class RedisRateLimiter:
    """Token buckets in Redis, shared by every gateway replica (see the module docstring)."""

    def __init__(self, url: str, *, timeout_s: float = 2.0, client: Any = None) -> None:
        if client is None:
            import redis.asyncio as redis

            client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._client = client
        self._script = client.register_script(_TOKEN_BUCKET)
        self._warned_at = 0.0

    async def acquire(self, key: str, *, per_minute: int) -> float:
        if per_minute <= 0:
            return 0.0
        try:
            wait_ms = await self._script(keys=[REDIS_PREFIX + key], args=[per_minute, per_minute / 60_000.0])
        except Exception as err:  # fail open: see the module docstring
            now = time.monotonic()
            if now - self._warned_at > 60:
                self._warned_at = now
                log.warning("rate limits not enforced: Redis did not answer (%s)", type(err).__name__)
            return 0.0
        return int(wait_ms) / 1000.0

    async def close(self) -> None:
        await self._client.aclose()
