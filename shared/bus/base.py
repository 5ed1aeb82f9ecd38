"""The message-bus interface: append-only streams with consumer groups (Redis Streams semantics).

Delivery is at-least-once: a consumer reads entries through its group, processes them, then acks
them; entries left unacked by a dead consumer are claimed by another after ``min_idle_ms``
(XAUTOCLAIM); an entry delivered ``max_deliveries`` times goes to the dead-letter stream
``<stream>:dead`` instead of being handed out again. Every consumer must therefore be idempotent.

Leases: an entry's idle time is its owner's lease. A live owner that works on an entry longer than
``min_idle_ms`` keeps it by calling :meth:`Bus.renew` every fraction of that time: a renewal resets the
idle time without counting a delivery (XCLAIM ... JUSTID), and only the entry's current owner can renew
it, so an owner that comes back after losing an entry (another consumer claimed it) learns so instead of
taking it back. ``claim_stale`` therefore only ever takes entries whose owner stopped renewing: a dead
or stalled consumer, never a live one (the live one's deliveries never grow, so it is never
dead-lettered for being slow).

Plain ``read`` (no group) tails a stream from an id, for observers such as the SSE endpoint;
``read_many`` tails several at once (one blocking call for every episode an organizer runs).
``backlog`` says how deep a group's queue is (entries not yet delivered, and delivered but not acked),
for backpressure and autoscaling; ``expire`` lets a finished episode's streams go after a while.
Field values are strings; structs travel as JSON in a ``data`` field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Entry:
    id: str  # stream entry id ("1716-0"), ordered within the stream
    fields: dict[str, str]  # the payload
    deliveries: int = 1  # how many times this entry has been handed to a consumer of the group


def dead_letter_stream(stream: str) -> str:
    return f"{stream}:dead"


@dataclass(frozen=True)
class Backlog:
    """How deep a consumer group's queue is."""

    lag: int  # entries not yet delivered to any consumer of the group
    pending: int  # delivered and not yet acked (being processed)

    @property
    def total(self) -> int:
        """Submitted and not yet done: waiting plus in progress."""
        return self.lag + self.pending


class Bus(Protocol):
    max_deliveries: int  # deliveries after which an entry is dead-lettered

    async def publish(self, stream: str, fields: dict[str, str], *, maxlen: int | None = None) -> str:
        """Append an entry; return its id. ``maxlen`` trims the stream approximately."""
        ...

    async def ensure_group(self, stream: str, group: str, *, start: str = "0") -> None:
        """Create the consumer group (and the stream) if missing; idempotent."""
        ...

    async def read_group(
        self, stream: str, group: str, consumer: str, *, count: int = 10, block_ms: int = 1000
    ) -> list[Entry]:
        """New entries for this consumer (XREADGROUP ... >); waits up to ``block_ms`` for one."""
        ...

    async def ack(self, stream: str, group: str, *ids: str) -> int:
        """Acknowledge processed entries; returns how many were pending."""
        ...

    async def claim_stale(
        self, stream: str, group: str, consumer: str, *, min_idle_ms: int, count: int = 10
    ) -> list[Entry]:
        """Take over entries idle longer than ``min_idle_ms`` (XAUTOCLAIM); dead-letter the over-delivered."""
        ...

    async def renew(self, stream: str, group: str, consumer: str, *ids: str) -> list[str]:
        """Renew ``consumer``'s lease on pending entries it owns: reset their idle time without counting
        a delivery. Returns the ids it still owns, in the order given; an id acked, unknown, or owned by
        another consumer (claimed since) is neither renewed nor returned."""
        ...

    async def read(self, stream: str, *, after: str = "0", count: int = 100, block_ms: int = 0) -> list[Entry]:
        """Entries after id ``after`` without a group (XREAD); ``block_ms`` > 0 waits for new ones."""
        ...

    async def read_many(
        self, positions: dict[str, str], *, count: int = 100, block_ms: int = 0
    ) -> list[tuple[str, Entry]]:
        """``read`` over several streams at once (stream -> the id to read after): ``(stream, entry)``
        pairs, at most ``count`` per stream; waits up to ``block_ms`` for the first new entry."""
        ...

    async def backlog(self, stream: str, group: str) -> Backlog:
        """How many entries the group has not yet been handed, and how many it holds unacked."""
        ...

    async def expire(self, stream: str, seconds: float) -> None:
        """Delete ``stream`` ``seconds`` from now (Redis EXPIRE: a later write does not cancel it)."""
        ...

    async def close(self) -> None: ...
