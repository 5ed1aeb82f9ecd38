"""The bus over Redis Streams (``redis.asyncio``): the distributed setup's event transport.

Command mapping: ``publish`` = XADD (``MAXLEN ~ n`` when ``maxlen`` is given: approximate trimming,
at least ``n`` entries stay); ``ensure_group`` = XGROUP CREATE ... MKSTREAM, a BUSYGROUP answer meaning
"already there"; ``read_group`` = XREADGROUP ... ``>``; ``ack`` = XACK; ``claim_stale`` = XAUTOCLAIM
(which bumps each claimed entry's delivery count) followed by XPENDING for the counts; ``renew`` = one
Lua script (atomic) that, for each id whose XPENDING owner is the caller, runs
``XCLAIM <stream> <group> <consumer> 0 <id> JUSTID`` (idle time reset, delivery count untouched), so a
consumer never takes back an entry another one claimed; an entry whose
count now exceeds ``max_deliveries`` has already been delivered that many times, so it is copied to
``<stream>:dead`` (original fields plus ``dead_stream``, ``dead_group``, ``dead_id``,
``dead_deliveries``) and acked instead of being returned; ``read`` = XREAD.

``read_many`` = one XREAD over several streams; ``backlog`` = XINFO GROUPS (``lag`` and ``pending``, Redis
7+); ``expire`` = EXPIRE.

Connections: one bounded pool per bus (``max_connections``, a :class:`~redis.asyncio.BlockingConnectionPool`):
a command that finds every connection busy waits for one (up to the socket timeout) instead of failing,
so a process with many episodes in flight slows down rather than losing writes (redis-py's default pool
raises ``MaxConnectionsError`` past 100 connections). A blocking read holds its connection while it waits:
size the pool for the blocking readers a process runs plus a few (the organizer runs two: its problems
stream and all its episodes' results; a gateway one per SSE follower).

:class:`CommandBatcher` (``bus.batcher()``) sends many small writes as a few pipelines: commands are
queued and one task sends what has queued up as one non-transactional pipeline, then the next, in order
of submission; a connection error retries the batch with backoff (so a write may land twice across a
Redis outage, never zero times while it lasts less than ``retry_budget_s``); a full queue makes
``call`` wait (backpressure) instead of growing without bound.

Limits and guarantees: at-least-once delivery, so consumers must be idempotent. Copying to the
dead-letter stream and acking are one MULTI/EXEC transaction, but the claim before them is a separate
command: a crash in between leaves the entry pending, to be dead-lettered by the next claim. Every call
has a timeout (socket and connect timeouts on the client); a blocking read longer than the socket
timeout is split into shorter BLOCK calls. ``block_ms <= 0`` means "do not wait" (never Redis's
"BLOCK 0 = forever"). Connection failures raise :class:`BusConnectionError`, which names the URL
(password hidden) and says how to fix it. A read through a missing group raises :class:`LookupError`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.bus.base import Backlog, Entry, dead_letter_stream

T = TypeVar("T")
log = logging.getLogger(__name__)

DEFAULT_MAX_CONNECTIONS = 64


# KEYS[1] = stream; ARGV = group, consumer, id...: renew the ids the consumer owns, return them.
_RENEW_LUA = """
local owned = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p > 0 and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    owned[#owned + 1] = ARGV[i]
  end
end
return owned
"""


class BusConnectionError(ConnectionError):
    """Redis could not be reached or did not answer in time."""


def redact(url: str) -> str:
    """The URL without its password, for error messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


class RedisStreamsBus:
    """The :class:`shared.bus.base.Bus` interface over a Redis server (5.0+; XAUTOCLAIM needs 6.2+)."""

    def __init__(
        self,
        url: str,
        *,
        max_deliveries: int = 5,
        socket_timeout_s: float = 10.0,
        connect_timeout_s: float = 5.0,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        if max_deliveries < 1:
            raise ValueError(f"max_deliveries must be >= 1, got {max_deliveries}")
        if socket_timeout_s <= 1.0:
            raise ValueError(
                f"socket_timeout_s must be > 1 s (blocking reads need headroom), got {socket_timeout_s}"
            )
        if max_connections < 2:
            raise ValueError(f"max_connections must be >= 2 (a blocking read and a write), got {max_connections}")
        self.url = url
        self.max_deliveries = max_deliveries
        self.max_connections = max_connections
        self._socket_timeout_s = socket_timeout_s
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=socket_timeout_s,  # a command waits this long for a free connection
            decode_responses=True,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=connect_timeout_s,
        )
        self._client: aioredis.Redis = aioredis.Redis.from_pool(pool)
        self._renew_script = self._client.register_script(_RENEW_LUA)
        self._batcher: CommandBatcher | None = None

    @property
    def client(self) -> aioredis.Redis:
        """The underlying client (for tests and key cleanup)."""
        return self._client

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await fn()
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise BusConnectionError(
                f"Redis at {redact(self.url)} failed during {what}: {str(exc).rstrip('.')}. Start Redis "
                "(`redis-server --daemonize yes`, or `docker compose up -d redis`) or point "
                "ASYNCTHINK_REDIS_URL / REDIS_URL at a reachable server."
            ) from exc

    async def _group_call(self, what: str, stream: str, group: str, fn: Callable[[], Awaitable[T]]) -> T:
        """:meth:`_call` for commands on a consumer group: a missing group is a :class:`LookupError`."""
        try:
            return await self._call(f"{what} {stream} {group}", fn)
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                raise LookupError(
                    f"no consumer group {group!r} on stream {stream!r}: call ensure_group first"
                ) from exc
            raise

    async def ping(self) -> None:
        """Raise :class:`BusConnectionError` unless the server answers (for readiness checks)."""
        await self._call("PING", self._client.ping)

    async def publish(self, stream: str, fields: dict[str, str], *, maxlen: int | None = None) -> str:
        entry_id = await self._call(
            f"XADD {stream}",
            lambda: self._client.xadd(stream, dict(fields), maxlen=maxlen, approximate=True),  # type: ignore[arg-type]
        )
        return str(entry_id)

    async def ensure_group(self, stream: str, group: str, *, start: str = "0") -> None:
        try:
            await self._call(
                f"XGROUP CREATE {stream} {group}",
                lambda: self._client.xgroup_create(stream, group, id=start, mkstream=True),
            )
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _block_slices(self, block_ms: int) -> tuple[float, int]:
        """(deadline, longest single BLOCK in ms) so one call never outlives the socket timeout."""
        return time.monotonic() + max(block_ms, 0) / 1000, int((self._socket_timeout_s - 1.0) * 1000)

    async def read_group(
        self, stream: str, group: str, consumer: str, *, count: int = 10, block_ms: int = 1000
    ) -> list[Entry]:
        deadline, max_block = self._block_slices(block_ms)
        while True:
            left = int((deadline - time.monotonic()) * 1000)
            block = min(left, max_block) if left > 0 else None
            reply = await self._group_call(
                "XREADGROUP",
                stream,
                group,
                lambda block=block: self._client.xreadgroup(  # type: ignore[misc]
                    group, consumer, {stream: ">"}, count=count, block=block
                ),
            )
            entries = _entries(reply)
            if entries or left <= max_block:
                return entries

    async def ack(self, stream: str, group: str, *ids: str) -> int:
        if not ids:
            return 0
        return int(await self._call(f"XACK {stream} {group}", lambda: self._client.xack(stream, group, *ids)))

    async def claim_stale(
        self, stream: str, group: str, consumer: str, *, min_idle_ms: int, count: int = 10
    ) -> list[Entry]:
        out: list[Entry] = []
        cursor = "0-0"
        for _ in range(10):  # bounded: each pass scans at most ~10 * count PEL entries
            want = count - len(out)
            reply = await self._group_call(
                "XAUTOCLAIM",
                stream,
                group,
                lambda cursor=cursor, want=want: self._client.xautoclaim(  # type: ignore[misc]
                    stream, group, consumer, min_idle_ms, start_id=cursor, count=want
                ),
            )
            cursor, claimed = str(reply[0]), [(str(i), f) for i, f in reply[1] if f is not None]
            if claimed:
                counts = await self._delivery_counts(stream, group, [i for i, _ in claimed])
                dead = [(i, f) for i, f in claimed if counts.get(i, 1) > self.max_deliveries]
                if dead:
                    await self._dead_letter(stream, group, dead, counts)
                out += [
                    Entry(i, dict(f), counts.get(i, 1))
                    for i, f in claimed
                    if counts.get(i, 1) <= self.max_deliveries
                ]
            if cursor == "0-0" or len(out) >= count:
                return out
        return out

    async def renew(self, stream: str, group: str, consumer: str, *ids: str) -> list[str]:
        if not ids:
            return []
        reply = await self._group_call(
            "renew (XCLAIM JUSTID)",
            stream,
            group,
            lambda: self._renew_script(keys=[stream], args=[group, consumer, *ids]),  # type: ignore[misc]
        )
        return [str(i) for i in reply or []]

    async def _delivery_counts(self, stream: str, group: str, ids: list[str]) -> dict[str, int]:
        async def run() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for i in ids:
                pipe.xpending_range(stream, group, min=i, max=i, count=1)
            return await pipe.execute()  # type: ignore[no-any-return]

        rows = await self._call(f"XPENDING {stream} {group}", run)
        return {str(r[0]["message_id"]): int(r[0]["times_delivered"]) for r in rows if r}

    async def _dead_letter(
        self, stream: str, group: str, dead: list[tuple[str, dict[str, str]]], counts: dict[str, int]
    ) -> None:
        async def run() -> list[Any]:
            pipe = self._client.pipeline(transaction=True)
            for i, fields in dead:
                record: dict[Any, Any] = {
                    **fields,
                    "dead_stream": stream,
                    "dead_group": group,
                    "dead_id": i,
                    "dead_deliveries": str(counts[i] - 1),  # this claim would have been one more
                }
                pipe.xadd(dead_letter_stream(stream), record)
            pipe.xack(stream, group, *[i for i, _ in dead])
            return await pipe.execute()  # type: ignore[no-any-return]

        await self._call(f"dead-letter to {dead_letter_stream(stream)}", run)

    async def read(
        self, stream: str, *, after: str = "0", count: int = 100, block_ms: int = 0
    ) -> list[Entry]:
        if after == "$":  # resolve once, so a sliced wait does not skip what arrived in between
            last = await self._call(f"XREVRANGE {stream}", lambda: self._last_id(stream))
            after = last
        deadline, max_block = self._block_slices(block_ms)
        while True:
            left = int((deadline - time.monotonic()) * 1000)
            block = min(left, max_block) if left > 0 else None
            reply = await self._call(
                f"XREAD {stream}",
                lambda block=block: self._client.xread({stream: after}, count=count, block=block),  # type: ignore[misc]
            )
            entries = _entries(reply)
            if entries or left <= max_block:
                return entries

    async def read_many(
        self, positions: dict[str, str], *, count: int = 100, block_ms: int = 0
    ) -> list[tuple[str, Entry]]:
        if not positions:
            return []
        deadline, max_block = self._block_slices(block_ms)
        streams: dict[Any, Any] = dict(positions)
        while True:
            left = int((deadline - time.monotonic()) * 1000)
            block = min(left, max_block) if left > 0 else None
            reply: Any = await self._call(
                f"XREAD {len(positions)} streams",
                lambda block=block: self._client.xread(streams, count=count, block=block),  # type: ignore[misc]
            )
            out = [
                (str(name), Entry(str(i), dict(f), 1)) for name, rows in reply or [] for i, f in rows if f is not None
            ]
            if out or left <= max_block:
                return out

    async def backlog(self, stream: str, group: str) -> Backlog:
        async def run() -> list[Any]:
            try:
                return await self._client.xinfo_groups(stream)  # type: ignore[no-any-return]
            except ResponseError as exc:
                if "no such key" in str(exc).lower():
                    return []
                raise

        for info in await self._call(f"XINFO GROUPS {stream}", run):
            if str(info.get("name")) == group:
                lag = info.get("lag")
                if lag is None:  # Redis cannot tell (entries deleted mid-stream): count from the last id
                    after = f"({info.get('last-delivered-id', '0-0')}"
                    rows: Any = await self._call(
                        f"XRANGE {stream}", lambda a=after: self._client.xrange(stream, min=a, count=100_000)  # type: ignore[misc]
                    )
                    lag = len(rows)
                return Backlog(lag=int(lag), pending=int(info.get("pending") or 0))
        return Backlog(lag=0, pending=0)

    async def list_lengths(self, keys: list[str]) -> list[int]:
        """LLEN of each key (a Celery queue's priority lists), in one round trip."""

        async def run() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.llen(key)
            return await pipe.execute()  # type: ignore[no-any-return]

        return [int(n) for n in await self._call("LLEN", run)]

    async def expire(self, stream: str, seconds: float) -> None:
        await self._call(f"EXPIRE {stream}", lambda: self._client.expire(stream, max(1, round(seconds))))

    def batcher(self) -> CommandBatcher:
        """This bus's :class:`CommandBatcher` (made on first use, on the running event loop)."""
        if self._batcher is None:
            self._batcher = CommandBatcher(self._client)
        return self._batcher

    def stream_reader(self) -> StreamReader:
        """A :class:`StreamReader` on a connection of its own (the caller closes it)."""
        return StreamReader(self)

    async def _last_id(self, stream: str) -> str:
        got = await self._client.xrevrange(stream, count=1)
        return str(got[0][0]) if got else "0-0"

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every key that starts with ``prefix`` (tests use a unique prefix per test)."""

        async def run() -> int:
            keys = [k async for k in self._client.scan_iter(match=f"{prefix}*", count=500)]
            return int(await self._client.delete(*keys)) if keys else 0

        return await self._call(f"DEL {prefix}*", run)

    async def close(self) -> None:
        if self._batcher is not None:
            await self._batcher.close()
        await self._client.aclose()


class CommandBatcher:
    """Queues Redis commands and sends them as few pipelines as the traffic allows (see the module doc).

    ``call(*args)`` (a raw command, e.g. ``"XADD", stream, "*", "data", json``) queues one command and
    returns a future of its reply; it waits only while ``max_pending`` commands are queued. One task
    sends the queue in order, up to ``max_batch`` commands per pipeline, on a connection of its own
    (taken from the pool once, not per pipeline): while a pipeline is on the wire, new commands gather
    for the next, so the batches grow with the load. A command queued with ``urgent=False`` (an event:
    an observation, not on anyone's critical path) may wait up to ``delay_s`` for company: the next
    urgent command (a task message, say) or :meth:`flush` takes it along, so a quiet process does not
    pay a round trip per event either. A command Redis refuses fails its own future; a connection
    failure retries the batch (jittered backoff, for up to ``retry_budget_s``), then fails its futures.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        max_batch: int = 512,
        max_pending: int = 20_000,
        retry_budget_s: float = 60.0,
        delay_s: float = 0.01,
    ) -> None:
        self.client = client
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.retry_budget_s = retry_budget_s
        self.delay_s = delay_s
        self._queue: collections.deque[tuple[tuple[Any, ...], asyncio.Future[Any]]] = collections.deque()
        self._in_flight = 0
        self._room = asyncio.Event()
        self._room.set()
        self._urgent = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._connection: Any = None
        self.sent = 0  # commands sent
        self.batches = 0  # pipelines sent
        self.failed = 0  # commands whose future failed (refused, or Redis unreachable past the budget)
        self.retries = 0  # pipelines sent again after a connection error

    @property
    def backlog(self) -> int:
        """Commands queued or on the wire."""
        return len(self._queue) + self._in_flight

    async def call(self, *args: Any, urgent: bool = True) -> asyncio.Future[Any]:
        """Queue one command (waiting while the queue is full); returns the future of its reply."""
        while len(self._queue) >= self.max_pending:
            self._room.clear()
            await self._room.wait()
        return self.call_nowait(*args, urgent=urgent)

    def fire(self, *args: Any, urgent: bool = True) -> asyncio.Future[Any]:
        """``call_nowait`` for a command nobody waits on: a failure is counted and logged, not raised."""
        fut = self.call_nowait(*args, urgent=urgent)
        fut.add_done_callback(_log_failure)
        return fut

    def call_nowait(self, *args: Any, urgent: bool = True) -> asyncio.Future[Any]:
        """Queue one command now, even past ``max_pending`` (for callbacks that cannot wait)."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((args, fut))
        if urgent:
            self._urgent.set()
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_all(), name="redis-command-batcher")
        return fut

    def flush(self) -> None:
        """Send what is queued without waiting for ``delay_s``."""
        if self._queue:
            self._urgent.set()

    async def drain(self) -> None:
        """Wait until every command queued so far has its reply (or its error)."""
        self.flush()
        while self._sender is not None and not self._sender.done():
            await asyncio.shield(self._sender)

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.drain(), 5.0)
        except (TimeoutError, Exception):
            if self._sender is not None:
                self._sender.cancel()
        if self._connection is not None:
            connection, self._connection = self._connection, None
            with contextlib.suppress(Exception):
                await self.client.connection_pool.release(connection)

    async def _send_all(self) -> None:
        while self._queue:
            if self.delay_s > 0 and not self._urgent.is_set() and len(self._queue) < self.max_batch:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._urgent.wait(), self.delay_s)
            self._urgent.clear()
            batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
            if len(self._queue) < self.max_pending:
                self._room.set()
            self._in_flight = len(batch)
            try:
                await self._send(batch)
            finally:
                self._in_flight = 0

    async def _execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """One pipeline on the batcher's own connection: send every command, read every reply (a reply
        Redis refused comes back as its exception)."""
        if self._connection is None:
            self._connection = await self.client.connection_pool.get_connection()
        conn = self._connection
        try:
            await conn.send_packed_command(conn.pack_commands(commands))
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await conn.read_response())
                except ResponseError as exc:
                    replies.append(exc)
            return replies
        except BaseException:
            # a broken or cancelled exchange leaves the connection out of step: start a fresh one
            self._connection = None
            with contextlib.suppress(Exception):
                await conn.disconnect()
            with contextlib.suppress(Exception):
                await self.client.connection_pool.release(conn)
            raise

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        deadline = time.monotonic() + self.retry_budget_s
        delay = 0.05
        while True:
            try:
                replies = await self._execute([args for args, _ in batch])
                break
            except asyncio.CancelledError:
                for _, fut in batch:
                    if not fut.done():
                        fut.cancel()
                raise
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                if time.monotonic() + delay > deadline:
                    log.error("Redis unreachable for %.0f s: %d queued commands dropped: %s", self.retry_budget_s,
                              len(batch), exc)  # fmt: skip
                    self.failed += len(batch)
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(BusConnectionError(f"Redis unreachable: {exc}"))
                    return
                self.retries += 1
                log.warning("sending %d Redis commands failed (%s); again in %.2fs", len(batch), exc, delay)
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 2.0)
        self.batches += 1
        self.sent += len(batch)
        for (_args, fut), reply in zip(batch, replies, strict=True):
            if fut.done():
                continue
            if isinstance(reply, Exception):
                self.failed += 1
                fut.set_exception(reply)
            else:
                fut.set_result(reply)


class StreamReader:
    """Blocking XREADs over many streams on a connection of its own (for one reader task: the
    organizer's result reader), without the pool and client machinery around each call."""

    def __init__(self, bus: RedisStreamsBus) -> None:
        self.bus = bus
        self._connection: Any = None

    async def read_many(
        self, positions: dict[str, str], *, count: int = 100, block_ms: int = 0
    ) -> list[tuple[str, Entry]]:
        if not positions:
            return []
        deadline, max_block = self.bus._block_slices(block_ms)
        args: list[Any] = ["STREAMS", *positions.keys(), *positions.values()]
        while True:
            left = int((deadline - time.monotonic()) * 1000)
            head: list[Any] = ["XREAD", "COUNT", count]
            if left > 0:
                head += ["BLOCK", min(left, max_block)]
            command = [*head, *args]
            reply = await self.bus._call(f"XREAD {len(positions)} streams", lambda c=command: self._xread(c))  # type: ignore[misc]
            out = _stream_entries(reply)
            if out or left <= max_block:
                return out

    async def _xread(self, command: list[Any]) -> Any:
        pool = self.bus.client.connection_pool
        if self._connection is None:
            self._connection = await pool.get_connection()
        conn = self._connection
        try:
            await conn.send_command(*command)
            return await conn.read_response()
        except BaseException:
            self._connection = None
            with contextlib.suppress(Exception):
                await conn.disconnect()
            with contextlib.suppress(Exception):
                await pool.release(conn)
            raise

    async def close(self) -> None:
        if self._connection is not None:
            conn, self._connection = self._connection, None
            with contextlib.suppress(Exception):
                await self.bus.client.connection_pool.release(conn)


def _stream_entries(reply: Any) -> list[tuple[str, Entry]]:
    """A raw XREAD reply (RESP2: a list of ``[stream, entries]``; RESP3: a map) -> (stream, entry) pairs."""
    if not reply:
        return []
    pairs = reply.items() if isinstance(reply, dict) else reply
    out: list[tuple[str, Entry]] = []
    for name, rows in pairs:
        for row in rows or ():
            entry_id, flat = row[0], row[1]
            if flat is None:
                continue
            if isinstance(flat, dict):
                fields = {str(k): str(v) for k, v in flat.items()}
            else:
                fields = {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}
            out.append((str(name), Entry(str(entry_id), fields, 1)))
    return out


def _log_failure(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("a queued Redis command failed: %s", fut.exception())


def _entries(reply: Any) -> list[Entry]:
    """An XREAD / XREADGROUP reply (RESP2: ``[[stream, [(id, fields), ...]], ...]``) -> entries."""
    out: list[Entry] = []
    for _name, rows in reply or []:
        out += [Entry(str(i), dict(f), 1) for i, f in rows if f is not None]
    return out
