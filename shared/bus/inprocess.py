"""An in-process bus with Redis Streams semantics, for the embedded setup and for tests.

What it models faithfully (the conformance suite in ``tests/conformance`` holds it to the same tests as
the Redis implementation): ids ``<ms>-<seq>`` that only grow; consumer groups with a last-delivered id;
a pending entries list (PEL) per group with, per entry, its owner, its delivery count and the time of
its last delivery (so an idle time); acks; claiming of entries idle at least ``min_idle_ms`` (XAUTOCLAIM),
which increments the delivery count; lease renewal by the owner only, which resets the idle time and
leaves the count (XCLAIM ... JUSTID); dead-lettering to ``<stream>:dead`` of an entry that has already
been delivered ``max_deliveries`` times instead of handing it out again; blocking reads woken by a
publish; plain tail reads after an id (``"$"`` means "only what comes next").

Limits: one event loop, one process, nothing persisted; ``maxlen`` trims exactly (Redis trims
approximately, keeping at least ``maxlen``). A read through a group that does not exist raises
:class:`LookupError`, as Redis answers NOGROUP. ``block_ms <= 0`` means "do not wait" for both kinds of
read (Redis would read ``BLOCK 0`` as "wait forever"; the interface never asks for that).
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_right
from dataclasses import dataclass, field

from shared.bus.base import Backlog, Entry, dead_letter_stream

IdTuple = tuple[int, int]


def parse_id(entry_id: str) -> IdTuple:
    """``"1716-3"`` -> ``(1716, 3)``; ``"1716"`` -> ``(1716, 0)``; raises ValueError on anything else."""
    ms, _, seq = entry_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        raise ValueError(f"bad stream id {entry_id!r}: expected '<ms>-<seq>', '0' or '$'") from None


def format_id(parts: IdTuple) -> str:
    return f"{parts[0]}-{parts[1]}"


@dataclass
class _Pending:
    consumer: str  # the consumer that holds the entry now
    deliveries: int  # how many times the entry has been handed to a consumer of the group
    delivered_at: float  # time.monotonic() of the last delivery (idle = now - delivered_at)


@dataclass
class _Group:
    last_delivered: IdTuple
    pending: dict[IdTuple, _Pending] = field(default_factory=dict)  # kept in id order (PEL)


@dataclass
class _Stream:
    ids: list[IdTuple] = field(default_factory=list)  # ascending
    data: dict[IdTuple, dict[str, str]] = field(default_factory=dict)
    last_id: IdTuple = (0, 0)
    groups: dict[str, _Group] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # set and replaced on every publish

    def after(self, after: IdTuple, count: int) -> list[IdTuple]:
        i = bisect_right(self.ids, after)
        return self.ids[i : i + count]


class InProcessBus:
    """The :class:`shared.bus.base.Bus` interface over in-memory streams (one event loop)."""

    def __init__(self, *, max_deliveries: int = 5) -> None:
        if max_deliveries < 1:
            raise ValueError(f"max_deliveries must be >= 1, got {max_deliveries}")
        self.max_deliveries = max_deliveries
        self._streams: dict[str, _Stream] = {}

    def _stream(self, name: str) -> _Stream:
        s = self._streams.get(name)
        if s is None:
            s = self._streams[name] = _Stream()
        return s

    def _group(self, stream: str, group: str) -> tuple[_Stream, _Group]:
        s = self._streams.get(stream)
        g = s.groups.get(group) if s else None
        if s is None or g is None:
            raise LookupError(f"no consumer group {group!r} on stream {stream!r}: call ensure_group first")
        return s, g

    def _next_id(self, s: _Stream) -> IdTuple:
        ms = int(time.time() * 1000)
        last_ms, last_seq = s.last_id
        return (ms, 0) if ms > last_ms else (last_ms, last_seq + 1)

    async def publish(self, stream: str, fields: dict[str, str], *, maxlen: int | None = None) -> str:
        s = self._stream(stream)
        new = self._next_id(s)
        s.ids.append(new)
        s.data[new] = {str(k): str(v) for k, v in fields.items()}
        s.last_id = new
        if maxlen is not None and len(s.ids) > maxlen:
            for old in s.ids[: len(s.ids) - maxlen]:
                del s.data[old]
            del s.ids[: len(s.ids) - maxlen]
        s.changed.set()
        s.changed = asyncio.Event()
        return format_id(new)

    async def ensure_group(self, stream: str, group: str, *, start: str = "0") -> None:
        s = self._stream(stream)
        if group not in s.groups:
            s.groups[group] = _Group(last_delivered=s.last_id if start == "$" else parse_id(start))

    async def read_group(
        self, stream: str, group: str, consumer: str, *, count: int = 10, block_ms: int = 1000
    ) -> list[Entry]:
        deadline = time.monotonic() + max(block_ms, 0) / 1000
        while True:
            s, g = self._group(stream, group)
            new = s.after(g.last_delivered, count)
            if new:
                now = time.monotonic()
                for i in new:
                    g.pending[i] = _Pending(consumer, 1, now)
                g.last_delivered = new[-1]
                return [Entry(format_id(i), dict(s.data[i]), 1) for i in new]
            if not await self._wait(s, deadline):
                return []

    async def ack(self, stream: str, group: str, *ids: str) -> int:
        s = self._streams.get(stream)
        g = s.groups.get(group) if s else None
        if g is None:
            return 0
        return sum(g.pending.pop(parse_id(i), None) is not None for i in ids)

    async def claim_stale(
        self, stream: str, group: str, consumer: str, *, min_idle_ms: int, count: int = 10
    ) -> list[Entry]:
        s, g = self._group(stream, group)
        now = time.monotonic()
        out: list[Entry] = []
        for i in sorted(g.pending):
            if len(out) >= count:
                break
            p = g.pending[i]
            if (now - p.delivered_at) * 1000 < min_idle_ms:
                continue
            fields = s.data.get(i)
            if fields is None:  # trimmed away while pending: Redis drops it from the PEL too
                del g.pending[i]
                continue
            if p.deliveries >= self.max_deliveries:
                await self._dead_letter(stream, group, i, fields, p.deliveries)
                del g.pending[i]
                continue
            p.consumer, p.deliveries, p.delivered_at = consumer, p.deliveries + 1, now
            out.append(Entry(format_id(i), dict(fields), p.deliveries))
        return out

    async def renew(self, stream: str, group: str, consumer: str, *ids: str) -> list[str]:
        _, g = self._group(stream, group)
        now = time.monotonic()
        owned: list[str] = []
        for entry_id in ids:
            p = g.pending.get(parse_id(entry_id))
            if p is not None and p.consumer == consumer:
                p.delivered_at = now  # the idle time restarts; the delivery count does not move
                owned.append(entry_id)
        return owned

    async def _dead_letter(self, stream: str, group: str, i: IdTuple, fields: dict[str, str], n: int) -> None:
        await self.publish(
            dead_letter_stream(stream),
            {
                **fields,
                "dead_stream": stream,
                "dead_group": group,
                "dead_id": format_id(i),
                "dead_deliveries": str(n),
            },
        )

    async def read(
        self, stream: str, *, after: str = "0", count: int = 100, block_ms: int = 0
    ) -> list[Entry]:
        s = self._stream(stream)
        start = s.last_id if after == "$" else parse_id(after)
        deadline = time.monotonic() + max(block_ms, 0) / 1000
        while True:
            found = s.after(start, count)
            if found:
                return [Entry(format_id(i), dict(s.data[i]), 1) for i in found]
            if not await self._wait(s, deadline):
                return []

    async def read_many(
        self, positions: dict[str, str], *, count: int = 100, block_ms: int = 0
    ) -> list[tuple[str, Entry]]:
        deadline = time.monotonic() + max(block_ms, 0) / 1000
        while True:
            out: list[tuple[str, Entry]] = []
            waits: list[asyncio.Event] = []
            for name, after in positions.items():
                s = self._stream(name)
                start = s.last_id if after == "$" else parse_id(after)
                out += [(name, Entry(format_id(i), dict(s.data[i]), 1)) for i in s.after(start, count)]
                waits.append(s.changed)
            left = deadline - time.monotonic()
            if out or left <= 0 or not waits:
                return out
            tasks = [asyncio.ensure_future(w.wait()) for w in waits]
            try:
                await asyncio.wait(tasks, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in tasks:
                    t.cancel()

    async def backlog(self, stream: str, group: str) -> Backlog:
        s = self._streams.get(stream)
        g = s.groups.get(group) if s else None
        if s is None or g is None:
            return Backlog(lag=0, pending=0)
        return Backlog(lag=len(s.ids) - bisect_right(s.ids, g.last_delivered), pending=len(g.pending))

    async def expire(self, stream: str, seconds: float) -> None:
        asyncio.get_running_loop().call_later(max(seconds, 0.0), self._streams.pop, stream, None)

    @staticmethod
    async def _wait(s: _Stream, deadline: float) -> bool:
        """Wait for the next publish on ``s`` until ``deadline``; False when the time is up."""
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            await asyncio.wait_for(s.changed.wait(), left)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        return None

    # Introspection for tests and the dashboard (not part of the Bus interface).
    def pending_count(self, stream: str, group: str) -> int:
        return len(self._group(stream, group)[1].pending)
