"""One conformance suite for every Bus implementation (in-process and Redis Streams).

Each test runs once per implementation (see ``conftest.py``); the Redis run is marked ``integration``
and uses a key prefix of its own that is deleted afterwards. Idle-time cases use thresholds of ~100 ms
so the suite stays fast; their sleeps are what they test (an entry must sit idle that long) and can only
run longer under load, which never turns a check vacuous. Blocking reads are never timed: a case first
waits until the read is seen blocked (:func:`until_blocked`), then checks what it returns.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest

from shared.bus.base import dead_letter_stream
from shared.bus.redis_streams import BusConnectionError, RedisStreamsBus, redact
from tests.conformance.conftest import MAX_DELIVERIES, BusUnderTest
from tests.helpers import until_redis_blocked


def _id(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


async def test_publish_then_read_in_order(bus_case: BusUnderTest) -> None:
    bus, s = bus_case.bus, bus_case.stream()
    ids = [await bus.publish(s, {"n": str(n)}) for n in range(5)]
    assert [_id(i) for i in ids] == sorted(_id(i) for i in ids)
    assert len(set(ids)) == 5
    got = await bus.read(s, after="0")
    assert [e.id for e in got] == ids
    assert [e.fields for e in got] == [{"n": str(n)} for n in range(5)]


async def test_read_after_an_id_tails_the_stream(bus_case: BusUnderTest) -> None:
    bus, s = bus_case.bus, bus_case.stream()
    ids = [await bus.publish(s, {"n": str(n)}) for n in range(4)]
    assert [e.fields["n"] for e in await bus.read(s, after=ids[1])] == ["2", "3"]
    assert await bus.read(s, after=ids[-1]) == []
    assert [e.fields["n"] for e in await bus.read(s, after="0", count=2)] == ["0", "1"]


async def test_read_of_missing_stream_is_empty(bus_case: BusUnderTest) -> None:
    assert await bus_case.bus.read(bus_case.stream("nothing"), after="0") == []


BLOCK_MS = 60_000  # a read that wakes on a publish returns long before this; one that does not, never does
WOKEN_S = 30  # ... so a reader that has not returned this long after the publish failed to wake


async def until_blocked(case: BusUnderTest, reader: asyncio.Task[Any]) -> None:
    """Return once ``reader`` waits inside the bus: the precondition of every case about a blocked read.

    Redis: the server lists a blocked XREAD/XREADGROUP client in this test's database (polled every 10 ms,
    failing after 10 s). In-process: the read has no I/O before it waits, so a few turns of the event
    loop bring it there; it must not have returned.
    """
    if isinstance(case.bus, RedisStreamsBus):
        await until_redis_blocked(case.bus.client, [reader])
        return
    for _ in range(5):
        await asyncio.sleep(0)
    assert not reader.done(), f"the read returned before it blocked: {reader.result()}"


async def assert_wakes_on_publish(
    case: BusUnderTest, stream: str, blocking_read: Coroutine[Any, Any, list[Any]]
) -> None:
    """A read blocked for a minute (``BLOCK_MS``) returns the entry a publish adds while it waits."""
    reader = asyncio.create_task(blocking_read)
    await until_blocked(case, reader)
    await case.bus.publish(stream, {"n": "1"})
    got = await asyncio.wait_for(reader, WOKEN_S)
    assert [e.fields["n"] for e in got] == ["1"]


async def test_blocking_read_wakes_on_publish(bus_case: BusUnderTest) -> None:
    bus, s = bus_case.bus, bus_case.stream()
    first = await bus.publish(s, {"n": "0"})
    await assert_wakes_on_publish(bus_case, s, bus.read(s, after=first, block_ms=BLOCK_MS))


async def test_blocking_read_from_dollar_sees_only_new(bus_case: BusUnderTest) -> None:
    bus, s = bus_case.bus, bus_case.stream()
    await bus.publish(s, {"n": "old"})
    reader = asyncio.create_task(bus.read(s, after="$", block_ms=BLOCK_MS))
    await until_blocked(bus_case, reader)
    await bus.publish(s, {"n": "new"})
    assert [e.fields["n"] for e in await asyncio.wait_for(reader, WOKEN_S)] == ["new"]


async def test_blocking_read_times_out_empty(bus_case: BusUnderTest) -> None:
    """The read is seen waiting (not answering at once), then gives up with nothing: never timed."""
    bus, s = bus_case.bus, bus_case.stream()
    reader = asyncio.create_task(bus.read(s, after="0", block_ms=1000))
    await until_blocked(bus_case, reader)
    assert await asyncio.wait_for(reader, 10) == []


async def test_ensure_group_is_idempotent_and_start_dollar_skips_history(bus_case: BusUnderTest) -> None:
    bus, s = bus_case.bus, bus_case.stream()
    await bus.publish(s, {"n": "before"})
    await bus.ensure_group(s, "g", start="$")
    await bus.ensure_group(s, "g", start="0")  # already there: no error, no reset
    await bus.publish(s, {"n": "after"})
    got = await bus.read_group(s, "g", "c1", block_ms=0)
    assert [e.fields["n"] for e in got] == ["after"]


async def test_ensure_group_creates_the_stream(bus_case: BusUnderTest) -> None:
    bus, s = bus_case.bus, bus_case.stream()
    await bus.ensure_group(s, "g")
    assert await bus.read_group(s, "g", "c1", block_ms=0) == []


async def test_read_group_without_group_raises_lookup_error(bus_case: BusUnderTest) -> None:
    bus, s = bus_case.bus, bus_case.stream()
    await bus.publish(s, {"n": "0"})
    with pytest.raises(LookupError, match="ensure_group"):
        await bus.read_group(s, "missing", "c1", block_ms=0)


async def test_group_delivers_each_entry_to_one_consumer(bus_case: BusUnderTest) -> None:
    bus, s = bus_case.bus, bus_case.stream()
    await bus.ensure_group(s, "g")
    ids = [await bus.publish(s, {"n": str(n)}) for n in range(6)]
    a = await bus.read_group(s, "g", "a", count=4, block_ms=0)
    b = await bus.read_group(s, "g", "b", count=4, block_ms=0)
    assert len(a) == 4 and len(b) == 2
    assert [e.id for e in a + b] == ids
    assert all(e.deliveries == 1 for e in a + b)
    assert await bus.read_group(s, "g", "a", block_ms=0) == []
    # A second group sees everything again, independently.
    await bus.ensure_group(s, "other")
    assert [e.id for e in await bus.read_group(s, "other", "x", count=10, block_ms=0)] == ids


async def test_blocking_read_group_wakes_on_publish(bus_case: BusUnderTest) -> None:
    bus, s = bus_case.bus, bus_case.stream()
    await bus.ensure_group(s, "g")
    await assert_wakes_on_publish(bus_case, s, bus.read_group(s, "g", "c1", block_ms=BLOCK_MS))


async def test_ack_removes_from_pending(bus_case: BusUnderTest) -> None:
    bus, s = bus_case.bus, bus_case.stream()
    await bus.ensure_group(s, "g")
    for n in range(3):
        await bus.publish(s, {"n": str(n)})
    got = await bus.read_group(s, "g", "a", block_ms=0)
    assert await bus.ack(s, "g", got[0].id, got[1].id) == 2
    assert await bus.ack(s, "g", got[0].id) == 0  # already acked
    claimed = await bus.claim_stale(s, "g", "b", min_idle_ms=0)
    assert [e.id for e in claimed] == [got[2].id]  # only the unacked one is still pending
    assert await bus.ack(s, "g", got[2].id) == 1
    assert await bus.claim_stale(s, "g", "b", min_idle_ms=0) == []


async def test_dead_consumer_entries_are_claimed_after_min_idle(bus_case: BusUnderTest) -> None:
    bus, s = bus_case.bus, bus_case.stream()
    await bus.ensure_group(s, "g")
    ids = [await bus.publish(s, {"n": str(n)}) for n in range(2)]
    got = await bus.read_group(s, "g", "dies", block_ms=0)  # reads, never acks
    assert [e.id for e in got] == ids
    assert await bus.claim_stale(s, "g", "rescuer", min_idle_ms=10_000) == []  # not idle long enough
    await asyncio.sleep(0.15)
    claimed = await bus.claim_stale(s, "g", "rescuer", min_idle_ms=100)
    assert [e.id for e in claimed] == ids
    assert [e.fields for e in claimed] == [{"n": "0"}, {"n": "1"}]
    assert [e.deliveries for e in claimed] == [2, 2]
    # Claiming resets the idle time: nobody can take them straight back.
    assert await bus.claim_stale(s, "g", "third", min_idle_ms=100) == []
    assert await bus.ack(s, "g", *ids) == 2


async def test_renew_keeps_a_live_owners_entries_and_counts_no_delivery(bus_case: BusUnderTest) -> None:
    bus, s = bus_case.bus, bus_case.stream()
    await bus.ensure_group(s, "g")
    ids = [await bus.publish(s, {"n": str(n)}) for n in range(2)]
    await bus.read_group(s, "g", "owner", block_ms=0)
    for _ in range(4):  # four renewals spanning well over min_idle_ms in all
        await asyncio.sleep(0.06)
        assert await bus.renew(s, "g", "owner", *ids) == ids
        assert await bus.claim_stale(s, "g", "other", min_idle_ms=100) == []  # never idle 100 ms
    await asyncio.sleep(0.15)  # the owner stops renewing (it died): the entries become claimable
    claimed = await bus.claim_stale(s, "g", "other", min_idle_ms=100)
    assert [e.id for e in claimed] == ids
    assert [e.deliveries for e in claimed] == [2, 2]  # the renewals counted no delivery
    assert await bus.ack(s, "g", *ids) == 2


async def test_renew_only_by_the_current_owner(bus_case: BusUnderTest) -> None:
    bus, s = bus_case.bus, bus_case.stream()
    await bus.ensure_group(s, "g")
    first, second = [await bus.publish(s, {"n": str(n)}) for n in range(2)]
    await bus.read_group(s, "g", "slow", block_ms=0)
    await asyncio.sleep(0.15)
    assert [e.id for e in await bus.claim_stale(s, "g", "rescuer", min_idle_ms=100, count=1)] == [first]
    # The stalled owner comes back: it still owns the second entry, not the first, and takes nothing back.
    assert await bus.renew(s, "g", "slow", first, second) == [second]
    assert await bus.renew(s, "g", "rescuer", first, second) == [first]
    assert await bus.renew(s, "g", "slow") == []
    await bus.ack(s, "g", first)
    assert await bus.renew(s, "g", "rescuer", first) == []  # acked: nothing to renew
    assert await bus.renew(s, "g", "slow", "1-1") == []  # never delivered
    await asyncio.sleep(0.15)
    claimed = await bus.claim_stale(s, "g", "third", min_idle_ms=100)
    assert [(e.id, e.deliveries) for e in claimed] == [(second, 2)]


async def test_an_owner_that_renews_is_never_dead_lettered(bus_case: BusUnderTest) -> None:
    """The organizer's old failure: sweeping for stale entries every half lease took its own in-flight
    entries, counted a delivery each time and dead-lettered them while they ran. Renewing owners sweep
    too, and nothing is claimed, counted or dead-lettered."""
    bus, s = bus_case.bus, bus_case.stream()
    await bus.ensure_group(s, "g")
    entry_id = await bus.publish(s, {"data": "a long episode"})
    await bus.read_group(s, "g", "organizer", block_ms=0)
    for _ in range(3 * MAX_DELIVERIES):
        await asyncio.sleep(0.04)
        assert await bus.renew(s, "g", "organizer", entry_id) == [entry_id]
        assert await bus.claim_stale(s, "g", "organizer", min_idle_ms=100) == []
    assert await bus.read(dead_letter_stream(s), after="0") == []
    assert await bus.ack(s, "g", entry_id) == 1


async def test_claim_respects_count(bus_case: BusUnderTest) -> None:
    bus, s = bus_case.bus, bus_case.stream()
    await bus.ensure_group(s, "g")
    for n in range(5):
        await bus.publish(s, {"n": str(n)})
    await bus.read_group(s, "g", "dies", count=5, block_ms=0)
    await asyncio.sleep(0.05)
    first = await bus.claim_stale(s, "g", "r", min_idle_ms=20, count=2)
    assert [e.fields["n"] for e in first] == ["0", "1"]
    rest = await bus.claim_stale(s, "g", "r2", min_idle_ms=20, count=10)
    assert [e.fields["n"] for e in rest] == ["2", "3", "4"]


async def test_delivery_counts_increase_then_dead_letter(bus_case: BusUnderTest) -> None:
    bus, s = bus_case.bus, bus_case.stream()
    assert bus.max_deliveries == MAX_DELIVERIES == 3
    await bus.ensure_group(s, "g")
    entry_id = await bus.publish(s, {"data": '{"poison": true}'})
    keep_id = ""
    seen = [e.deliveries for e in await bus.read_group(s, "g", "c0", block_ms=0)]
    for k in range(1, MAX_DELIVERIES):
        await asyncio.sleep(0.03)
        if k == MAX_DELIVERIES - 1:  # a healthy entry delivered once rides along and is not dead-lettered
            keep_id = await bus.publish(s, {"data": "fine"})
            await bus.read_group(s, "g", "c0", block_ms=0)
            await asyncio.sleep(0.03)
        claimed = await bus.claim_stale(s, "g", f"c{k}", min_idle_ms=20)
        seen.append(next(e.deliveries for e in claimed if e.id == entry_id))
    assert seen == [1, 2, 3]
    await asyncio.sleep(0.03)
    # Delivered max_deliveries times: the next claim dead-letters it instead of handing it out.
    claimed = await bus.claim_stale(s, "g", "last", min_idle_ms=20)
    assert [e.id for e in claimed] == [keep_id]
    assert [e.deliveries for e in claimed] == [3]  # read, claimed at c2, claimed now
    dead = await bus.read(dead_letter_stream(s), after="0")
    assert len(dead) == 1
    assert dead[0].fields["data"] == '{"poison": true}'
    assert dead[0].fields["dead_id"] == entry_id
    assert dead[0].fields["dead_stream"] == s
    assert dead[0].fields["dead_group"] == "g"
    assert dead[0].fields["dead_deliveries"] == str(MAX_DELIVERIES)
    assert await bus.ack(s, "g", entry_id) == 0  # no longer pending
    assert await bus.ack(s, "g", keep_id) == 1
    await asyncio.sleep(0.03)
    assert await bus.claim_stale(s, "g", "again", min_idle_ms=20) == []
    assert len(await bus.read(dead_letter_stream(s), after="0")) == 1  # dead-lettered once, not twice


async def test_maxlen_trims_the_stream(bus_case: BusUnderTest) -> None:
    bus, s = bus_case.bus, bus_case.stream()
    for n in range(300):
        await bus.publish(s, {"n": str(n)}, maxlen=10)
    got = await bus.read(s, after="0", count=1000)
    assert 10 <= len(got) < 300  # approximate in Redis: at least maxlen stay
    assert got[-1].fields["n"] == "299"


async def test_redis_connection_error_names_url_and_fix() -> None:
    bus = RedisStreamsBus("redis://:sekret@127.0.0.1:1/0", socket_timeout_s=2.0, connect_timeout_s=0.5)
    try:
        with pytest.raises(BusConnectionError) as info:
            await bus.publish("s", {"a": "b"})
    finally:
        await bus.close()
    message = str(info.value)
    assert "127.0.0.1:1" in message
    assert "sekret" not in message
    assert "redis-server" in message and "REDIS_URL" in message
    assert isinstance(info.value, ConnectionError)


def test_redact_hides_password_only() -> None:
    assert redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact("redis://u:p@h:1/2") == "redis://u:***@h:1/2"


# -- issue 19: several streams in one read, queue depth, expiry ----------------------------------------------


async def test_read_many_reads_every_stream_after_its_own_id(bus_case: BusUnderTest) -> None:
    bus = bus_case.bus
    a, b, empty = bus_case.stream("a"), bus_case.stream("b"), bus_case.stream("none")
    a1 = await bus.publish(a, {"n": "a1"})
    await bus.publish(a, {"n": "a2"})
    await bus.publish(b, {"n": "b1"})
    got = await bus.read_many({a: a1, b: "0", empty: "0"})
    assert sorted((s, e.fields["n"]) for s, e in got) == [(a, "a2"), (b, "b1")]
    assert await bus.read_many({a: "$", b: "$"}, block_ms=50) == []


async def test_read_many_blocks_until_any_stream_gets_an_entry(bus_case: BusUnderTest) -> None:
    bus = bus_case.bus
    a, b = bus_case.stream("a"), bus_case.stream("b")
    reading = asyncio.create_task(bus.read_many({a: "0", b: "0"}, block_ms=BLOCK_MS))
    await until_blocked(bus_case, reading)
    await bus.publish(b, {"n": "late"})
    got = await asyncio.wait_for(reading, WOKEN_S)
    assert [(s, e.fields["n"]) for s, e in got] == [(b, "late")]


async def test_backlog_counts_waiting_and_pending_entries(bus_case: BusUnderTest) -> None:
    bus, s = bus_case.bus, bus_case.stream()
    await bus.ensure_group(s, "g")
    for i in range(5):
        await bus.publish(s, {"i": str(i)})
    depth = await bus.backlog(s, "g")
    assert (depth.lag, depth.pending, depth.total) == (5, 0, 5)
    taken = await bus.read_group(s, "g", "c1", count=2, block_ms=0)
    await bus.ack(s, "g", taken[0].id)
    depth = await bus.backlog(s, "g")
    assert (depth.lag, depth.pending, depth.total) == (3, 1, 4)
    assert (await bus.backlog(bus_case.stream("nothing"), "g")).total == 0


async def test_expire_lets_a_stream_go(bus_case: BusUnderTest) -> None:
    bus, s = bus_case.bus, bus_case.stream()
    await bus.publish(s, {"n": "1"})
    await bus.expire(s, 1)
    assert len(await bus.read(s)) == 1
    await asyncio.sleep(1.3)  # what is tested: the stream outlives its 1 s no longer (a sleep only runs long)
    assert await bus.read(s) == []
