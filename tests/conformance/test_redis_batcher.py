"""Issue 19: the Redis bus under load: a bounded pool that waits instead of failing, and the command batcher.

* more concurrent commands than the pool has connections all succeed (they wait for a connection;
  redis-py's default pool raised ``MaxConnectionsError`` past 100, which lost events);
* the batcher sends queued commands in order, in few pipelines, returns each reply (or the error Redis
  gave that one command), makes callers wait while it is full, holds an event (``urgent=False``) until
  its delay or the next urgent command, and retries a batch through a broken connection;
* a :class:`~shared.bus.redis_streams.StreamReader` reads many streams on a connection of its own.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.exceptions import ResponseError

from shared.bus.redis_streams import RedisStreamsBus
from tests.conformance.conftest import REDIS_URL
from tests.helpers import redis_bus_or_skip, until_redis_blocked

pytestmark = pytest.mark.integration


@pytest.fixture
async def bus() -> AsyncIterator[RedisStreamsBus]:
    await (await redis_bus_or_skip(REDIS_URL)).close()  # skip (or fail in CI) when Redis is down
    bus = RedisStreamsBus(REDIS_URL, max_connections=3)
    prefix = f"asyncthink-test:{uuid.uuid4().hex[:12]}:"
    bus.prefix = prefix  # type: ignore[attr-defined]
    try:
        yield bus
    finally:
        await bus.delete_prefix(prefix)
        await bus.close()


def key(bus: RedisStreamsBus, name: str) -> str:
    return f"{bus.prefix}{name}"  # type: ignore[attr-defined]


async def test_a_small_pool_waits_instead_of_failing(bus: RedisStreamsBus) -> None:
    s = key(bus, "s")
    blockers = [asyncio.create_task(bus.read(key(bus, f"idle{i}"), block_ms=3000)) for i in range(2)]
    await until_redis_blocked(bus.client, blockers, count=2)  # two of the three connections wait in XREAD
    ids = await asyncio.gather(*(bus.publish(s, {"i": str(i)}) for i in range(200)))
    assert len(set(ids)) == 200 and len(await bus.read(s, count=1000)) == 200
    assert await asyncio.gather(*blockers) == [[], []]


async def test_batcher_keeps_order_replies_and_errors(bus: RedisStreamsBus) -> None:
    batcher = bus.batcher()
    s, lst = key(bus, "s"), key(bus, "l")
    futures = [await batcher.call("XADD", s, "*", "i", str(i)) for i in range(300)]
    bad = await batcher.call("LPUSH", s, "x")  # WRONGTYPE: this one fails, its neighbours do not
    futures += [await batcher.call("RPUSH", lst, str(i)) for i in range(5)]
    await batcher.drain()
    assert [e.fields["i"] for e in await bus.read(s, count=1000)] == [str(i) for i in range(300)]
    assert all(f.done() and f.exception() is None for f in futures)
    assert isinstance(bad.exception(), ResponseError) and batcher.failed == 1
    assert await bus.client.lrange(lst, 0, -1) == [str(i) for i in range(5)]
    assert batcher.batches < 305 / 2  # queued together, sent together


async def test_batcher_makes_callers_wait_when_full(bus: RedisStreamsBus) -> None:
    batcher = bus.batcher()
    batcher.max_pending = 10
    s = key(bus, "s")
    calls = [asyncio.create_task(batcher.call("XADD", s, "*", "i", str(i))) for i in range(100)]
    await asyncio.sleep(0)
    assert len(batcher._queue) <= 10 + 1  # the rest wait in call()
    await asyncio.gather(*calls)
    await batcher.drain()
    assert len(await bus.read(s, count=1000)) == 100


async def test_an_event_waits_for_company_but_not_past_its_delay(bus: RedisStreamsBus) -> None:
    batcher = bus.batcher()
    batcher.delay_s = 60.0  # far longer than the test: only company can send the event
    s = key(bus, "s")
    lazy = await batcher.call("XADD", s, "*", "kind", "event", urgent=False)
    for _ in range(10):  # the sender has run and chosen to wait
        await asyncio.sleep(0)
    assert not lazy.done() and batcher.batches == 0  # held for company
    urgent = await batcher.call("XADD", s, "*", "kind", "task")
    await asyncio.wait_for(asyncio.gather(lazy, urgent), 10)
    assert batcher.batches == 1  # sent together, with the urgent one
    batcher.delay_s = 0.2
    alone = await batcher.call("XADD", s, "*", "kind", "event", urgent=False)
    await asyncio.wait_for(alone, 10)  # no company: sent after its delay
    assert batcher.batches == 2 and len(await bus.read(s)) == 3


async def test_batcher_retries_through_a_broken_connection(bus: RedisStreamsBus) -> None:
    batcher = bus.batcher()
    s = key(bus, "s")
    await (await batcher.call("XADD", s, "*", "i", "0"))
    await batcher._connection.disconnect()  # the connection breaks under the batcher
    await (await batcher.call("XADD", s, "*", "i", "1"))
    assert [e.fields["i"] for e in await bus.read(s)] == ["0", "1"]


async def test_stream_reader_reads_many_streams(bus: RedisStreamsBus) -> None:
    reader = bus.stream_reader()
    a, b = key(bus, "a"), key(bus, "b")
    try:
        reading = asyncio.create_task(reader.read_many({a: "0", b: "0"}, block_ms=30_000))
        await until_redis_blocked(bus.client, [reading])
        await bus.publish(a, {"n": "1", "m": "x"})
        got = await asyncio.wait_for(reading, 3)
        assert [(s, e.fields) for s, e in got] == [(a, {"n": "1", "m": "x"})]
        await bus.publish(b, {"n": "2"})
        got = await reader.read_many({a: got[0][1].id, b: "0"})
        assert [(s, e.fields["n"]) for s, e in got] == [(b, "2")]
    finally:
        await reader.close()
