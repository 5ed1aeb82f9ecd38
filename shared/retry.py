"""Bounded, jittered retries of one async call, for writes that must survive a short outage.

:func:`retry_async` calls ``fn()`` until it returns, retrying only the given exception types, with
exponential backoff and jitter ("equal jitter": each delay is half the exponential step plus a random
part of up to the other half, so retries of many clients spread out but never hammer at zero delay),
and gives up when the next attempt would start after ``budget_s``: then the last error propagates.
Each attempt keeps its own timeout (the client's socket timeouts); the budget bounds the whole.

:data:`REDIS_ERRORS` names what "Redis is unreachable for now" looks like to this project's code: the
Redis client's own ``ConnectionError`` and ``TimeoutError`` (which are *not* subclasses of Python's
builtins of the same names) and the bus's :class:`~shared.bus.redis_streams.BusConnectionError`.

Limits: retrying a write that reached the server but whose reply was lost repeats it, so only
idempotent writes (``SET NX``, an XADD whose duplicates readers drop, XACK) belong here.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.bus.redis_streams import BusConnectionError

T = TypeVar("T")

REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError, BusConnectionError)

log = logging.getLogger(__name__)


def backoff_delay(attempt: int, *, base_s: float = 0.2, cap_s: float = 5.0, rng: random.Random | None = None) -> float:
    """The delay before retry number ``attempt`` (1-based): ``d/2 + U(0, d/2)`` with ``d = min(cap, base·2^(n-1))``."""
    step = min(cap_s, base_s * 2 ** (attempt - 1))
    return step / 2 + (rng or random).uniform(0, step / 2)


async def retry_async(
    what: str,
    fn: Callable[[], Awaitable[T]],
    *,
    retry_on: tuple[type[BaseException], ...] = REDIS_ERRORS,
    budget_s: float = 60.0,
    base_s: float = 0.2,
    cap_s: float = 5.0,
    logger: logging.Logger | None = None,
) -> T:
    """``await fn()``, retried on ``retry_on`` with jittered backoff for up to ``budget_s`` (see the module doc)."""
    deadline = time.monotonic() + budget_s
    attempt = 0
    logger = logger or log
    while True:
        try:
            result = await fn()
        except retry_on as exc:
            attempt += 1
            delay = backoff_delay(attempt, base_s=base_s, cap_s=cap_s)
            if time.monotonic() + delay > deadline:
                logger.error("%s: giving up after %d attempts: %s", what, attempt, exc)
                raise
            logger.warning("%s failed (%s); retry %d in %.2fs", what, _short(exc), attempt, delay)
            await asyncio.sleep(delay)
            continue
        if attempt:
            logger.info("%s succeeded after %d retries", what, attempt)
        return result


def _short(exc: BaseException) -> str:
    text = str(exc).split(". Start Redis")[0]  # the bus's how-to-fix advice is noise in a retry line
    return f"{type(exc).__name__}: {text[:200]}"
