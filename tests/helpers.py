"""Small assertions and server checks shared by test modules."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

from shared.protocol import Fork, Join, Role, parse
from tests.missing import missing
from trainer.synth.records import Episode, TraceRecord

# How long a test waits for a condition before it fails; ASYNCTHINK_TEST_WAIT_S shortens it (mutation runs:
# a mutant that breaks the wiring then fails in seconds) or lengthens it (a very slow machine).
WAIT_S = float(os.environ.get("ASYNCTHINK_TEST_WAIT_S", "15"))

REDIS_HINT = "start it: redis-server --daemonize yes --port 6379 (apt-get install redis-server)"


def corrupt_episode(ep: Episode, nth: int, wrong_answer: str) -> None:
    """Break the ``nth`` (1-based) synthesized episode the way the synthesis checks must catch: 1 a fork
    id used twice, 2 ``wrong_answer`` in place of the answer, 3 injected text that is not the worker's
    return. Later episodes stay as they are."""
    org = ep.organizer
    if nth == 1:
        org.completion = org.completion.replace("<FORK-1>", "<FORK-1>x</FORK-1><FORK-1>", 1)
    elif nth == 2:
        head, _, _ = org.completion.partition("<ANSWER>")
        org.completion = head + f"<ANSWER>{wrong_answer}</ANSWER>"
    elif nth == 3:
        a, _ = org.injected[0]
        org.completion = org.completion[:a] + "Z" + org.completion[a + 1 :]


def peak_active_workers(records: Iterable[TraceRecord], capacity: int) -> int:
    """The most workers any organizer record keeps forked-and-not-joined at once; every record must parse
    without format errors at ``capacity``."""
    most = 0
    for rec in records:
        if rec.kind != "organizer":
            continue
        events, errors = parse(rec.completion, Role.ORGANIZER, capacity=capacity)
        assert errors == [], (rec.problem_id, errors)
        active = 0
        for e in events:
            active += 1 if isinstance(e, Fork) else -1 if isinstance(e, Join) else 0
            most = max(most, active)
    return most


async def redis_bus_or_skip(url: str, **options: Any) -> Any:
    """A pinged ``RedisStreamsBus`` at ``url``; skips the test when Redis is unreachable, fails in CI."""
    from shared.bus.redis_streams import BusConnectionError, RedisStreamsBus

    bus = RedisStreamsBus(url, **{"socket_timeout_s": 5.0, "connect_timeout_s": 2.0, **options})
    try:
        await bus.ping()
    except BusConnectionError as exc:
        await bus.close()
        missing(f"Redis is unreachable: {exc}", REDIS_HINT)
    return bus


@contextlib.contextmanager
def recorded_connects() -> Iterator[list[dict[str, Any]]]:
    """The driver keyword arguments of every database connection attempted inside the block, by any
    SQLAlchemy engine: how a test checks that a connection is tried once, with a timeout, without
    timing it."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    seen: list[dict[str, Any]] = []

    def record(dialect: Any, conn_rec: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        seen.append(dict(cparams))

    event.listen(Engine, "do_connect", record)
    try:
        yield seen
    finally:
        event.remove(Engine, "do_connect", record)


async def until_redis_blocked(client: Any, readers: Iterable[Any], count: int = 1, timeout_s: float = 10.0) -> None:
    """Return once ``count`` clients of ``client``'s database are blocked in XREAD/XREADGROUP on the server
    (``CLIENT LIST``, polled every 10 ms): the precondition of a test about blocked reads, checked instead of
    slept for. Fails when one of the ``readers`` (tasks) returns first, or after ``timeout_s``."""
    import asyncio

    db = str(client.connection_pool.connection_kwargs.get("db", 0))
    readers = list(readers)
    blocked = 0
    for _ in range(int(timeout_s / 0.01)):
        for task in readers:
            assert not task.done(), f"a read returned before it blocked: {task.result()}"
        clients = await client.client_list()
        blocked = sum(
            c["db"] == db and "b" in c["flags"] and c["cmd"] in ("xread", "xreadgroup") for c in clients
        )
        if blocked >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{blocked} of {count} reads blocked in Redis after {timeout_s} s")


async def until(
    check: Callable[[], bool | Awaitable[bool]], what: str, timeout_s: float | None = None, every_s: float = 0.01
) -> None:
    """Return once ``check()`` (plain or async) is true, polled every ``every_s``; fail naming ``what`` after
    ``timeout_s`` (default ``WAIT_S``). The way a test waits for something to happen instead of sleeping."""
    timeout_s = WAIT_S if timeout_s is None else timeout_s
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(every_s)
