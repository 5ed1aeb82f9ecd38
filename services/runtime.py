"""Glue shared by the embedded and the distributed setups: event sinks and the engine factory.

* :class:`StoreSink` persists each worker segment as soon as its ``segment`` event arrives
  (``repository.save_segment``), in a thread (``asyncio.to_thread``) so the event loop never waits on
  the database; in background mode the write does not delay the episode at all. A segment is unique per ``(episode_id, agent)`` in the store, so a repeated event (a
  redelivered worker, a recursive child reported twice) replaces the row instead of duplicating it.
  With a :class:`SegmentWriter` (the organizer's choice) it takes each worker's complete segment, ids
  included, from the engine (``record``) instead, and the writer stores the segments of every episode
  of the process in batches, one transaction per batch; the final save then writes only the clock
  spans of those rows (``save_episode(live_agents=...)``): segments are appended, never rewritten.
* :class:`BusSink` publishes every :class:`~shared.messages.EpisodeEvent` as JSON (field ``data``) to
  ``events_stream(episode_id)``, where the gateway's SSE endpoint tails it. With a
  :class:`~shared.bus.redis_streams.CommandBatcher` (the organizer's choice) events of every episode go
  out in shared pipelines, in order, and an emit waits only when the batcher's queue is full
  (backpressure): an event is never dropped for want of a connection.
* :class:`FanoutSink` sends one event to several sinks; a failing sink is logged and skipped.
* :class:`StoreCheckpoint` saves the organizer's checkpoints (its partial sequence with ids and mask, at
  each fork and join) as the episode's organizer segment, so a restarted organizer can resume it.
* :func:`build_engine` turns a :class:`~shared.messages.SubmitProblem` into an :class:`Engine`.
* :func:`open_service_backend` opens the model backend of a service process:
  ``shared.backends.registry.open_backend(settings.model, settings)``, unless the environment variable
  ``ASYNCTHINK_BACKEND_FACTORY=module:attr`` names a factory ``(settings) -> backend``. That hook is for
  tests and benchmarks (the scenario suite's scripted backend); nothing sets it by default.

Limits: the ``segment`` event carries no token ids (the engine leaves them out to keep events small),
so a segment a plain :class:`StoreSink` stores live has its text and metadata but empty id lists, and
the final ``save_episode`` writes it again whole. A sink error never fails an episode (the engine
swallows it too); events lost to a Redis outage longer than the batcher's retry budget are counted
(``CommandBatcher.failed``) and logged.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from services.human.engine import engine_for
from shared.agents import Snapshot
from shared.backends.base import ModelBackend
from shared.bus.base import Bus
from shared.config import Settings
from shared.engine import Checkpointer, Engine, EngineConfig, EventSink, SegmentRecorder, WorkerEndpoint
from shared.episode import MAX_BUDGET
from shared.messages import EpisodeEvent, EventKind, SegmentRecord, SubmitProblem, events_stream
from shared.tasks import get_task

log = logging.getLogger(__name__)

# Approximate cap on one episode's event stream: a safety net no valid episode reaches (a text event per
# organizer token at the largest budget, and five events per fork), so trimming never drops the events of a
# running episode; a finished episode's streams expire instead (the organizer's ``stream_ttl_s``).
EVENTS_MAXLEN = 4 * MAX_BUDGET
BACKEND_FACTORY_ENV = "ASYNCTHINK_BACKEND_FACTORY"  # "module:attr", a factory (settings) -> ModelBackend


def open_service_backend(settings: Settings) -> ModelBackend:
    """The backend a service process uses (see the module docstring for the test hook)."""
    hook = os.environ.get(BACKEND_FACTORY_ENV)
    if hook:
        module, _, attr = hook.partition(":")
        if not module or not attr:
            raise ValueError(f"{BACKEND_FACTORY_ENV} must be 'module:attr', got {hook!r}")
        factory = getattr(importlib.import_module(module), attr)
        return factory(settings)  # type: ignore[no-any-return]
    from shared.backends.registry import open_backend  # type: ignore[import-not-found,unused-ignore]

    return open_backend(settings.model, settings)  # type: ignore[no-any-return]


class SegmentWriter:
    """Stores the worker segments of every episode a process runs, in batches (one transaction each).

    ``add`` queues a segment and returns at once; one task writes what has queued up (at most
    ``max_batch`` rows, gathered for up to ``delay_s`` unless an episode waits for its segments) in a
    thread, then the next batch, so the database sees one transaction per batch whatever the number
    of episodes. :meth:`drain` waits until an episode's segments queued so far are
    written; :meth:`forget` returns the agents of an episode stored whole (for ``save_episode``'s
    ``live_agents``) and forgets the episode. A batch that fails is written again episode by episode; a
    segment that still fails is left to the final save.
    """

    def __init__(self, session_factory: Callable[[], Any], *, max_batch: int = 256, delay_s: float = 0.1) -> None:
        self.session_factory = session_factory
        self.max_batch = max_batch
        self.delay_s = delay_s
        self._now = asyncio.Event()  # an episode waits for its segments: write without gathering more
        self._queue: collections.deque[tuple[str, SegmentRecord]] = collections.deque()
        self._queued: collections.Counter[str] = collections.Counter()
        self._done: collections.Counter[str] = collections.Counter()
        self._stored: dict[str, set[str]] = {}
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self.written = 0
        self.batches = 0
        self.failed = 0

    @property
    def backlog(self) -> int:
        """Segments queued and not yet written."""
        return len(self._queue)

    def add(self, episode_id: str, segment: SegmentRecord) -> None:
        self._queue.append((episode_id, segment))
        self._queued[episode_id] += 1
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="segment-writer")

    async def drain(self, episode_id: str) -> None:
        """Wait until every segment of ``episode_id`` queued so far is written (or given up on)."""
        target = self._queued.get(episode_id, 0)
        if self._done.get(episode_id, 0) < target:
            self._now.set()
        async with self._changed:
            await self._changed.wait_for(lambda: self._done.get(episode_id, 0) >= target)

    def forget(self, episode_id: str) -> set[str]:
        """The agents of ``episode_id`` whose segments are stored whole; the episode is forgotten."""
        self._queued.pop(episode_id, None)
        self._done.pop(episode_id, None)
        return self._stored.pop(episode_id, set())

    async def _run(self) -> None:
        while self._queue:
            if self.delay_s > 0 and not self._now.is_set() and len(self._queue) < self.max_batch:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._now.wait(), self.delay_s)
            self._now.clear()
            batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
            try:
                stored = await asyncio.to_thread(self._write, batch)
            except Exception:
                log.exception("writing %d segments failed", len(batch))
                stored = set()
            self.batches += 1
            for eid, seg in batch:
                if (eid, seg.agent) in stored:
                    self.written += 1
                else:
                    self.failed += 1
                if eid not in self._queued:
                    continue  # forgotten meanwhile (its episode ended or was cancelled)
                self._done[eid] += 1
                if (eid, seg.agent) in stored:
                    self._stored.setdefault(eid, set()).add(seg.agent)
                else:
                    self._stored.get(eid, set()).discard(seg.agent)
            async with self._changed:
                self._changed.notify_all()

    def _write(self, batch: list[tuple[str, SegmentRecord]]) -> set[tuple[str, str]]:
        from shared.store import repository

        rows = list({(eid, seg.agent): (eid, seg) for eid, seg in batch}.values())  # the latest per agent
        try:
            with self.session_factory() as session:
                repository.save_segments(session, rows=rows)
            return {(eid, seg.agent) for eid, seg in rows}
        except Exception:
            log.warning("a batch of %d segments failed; writing them episode by episode", len(rows), exc_info=True)
        stored: set[tuple[str, str]] = set()
        for eid in {eid for eid, _ in rows}:
            mine = [(e, seg) for e, seg in rows if e == eid]
            try:
                with self.session_factory() as session:
                    repository.save_segments(session, rows=mine)
                stored |= {(e, seg.agent) for e, seg in mine}
            except Exception:
                log.exception("saving %d segments of episode %s failed", len(mine), eid)
        return stored


class StoreSink:
    """Saves each worker segment to the store as it completes (``segment`` events only).

    ``background=True`` (the organizer's choice): ``emit`` starts the write in a thread and returns at
    once, so a database round trip never delays the join waiting for that worker; :meth:`drain` waits
    for the writes and must run before the final ``save_episode`` (else a late live write, which has
    no token ids, could replace the complete row).

    With ``writer`` (a :class:`SegmentWriter`; the organizer's choice) the sink is the engine's
    :class:`~shared.agents.SegmentRecorder` instead: ``record`` hands each complete worker segment to
    the writer and ``segment`` events are ignored.
    """

    def __init__(
        self,
        session_factory: Callable[[], Any],
        episode_id: str,
        *,
        background: bool = False,
        writer: SegmentWriter | None = None,
    ) -> None:
        self.session_factory = session_factory
        self.episode_id = episode_id
        self.background = background
        self.writer = writer
        self._writes: set[asyncio.Task[None]] = set()

    def record(self, episode_id: str, segment: SegmentRecord) -> None:
        if self.writer is not None and episode_id == self.episode_id:
            self.writer.add(episode_id, segment)

    async def emit(self, event: EpisodeEvent) -> None:
        if self.writer is not None:
            return
        if event.kind is not EventKind.SEGMENT or event.episode_id != self.episode_id:
            return
        data = event.data.get("segment")
        if not isinstance(data, dict):
            return
        segment = SegmentRecord.model_validate(data)
        if not self.background:
            await asyncio.to_thread(self._save, segment)
            return
        write = asyncio.create_task(self._save_logged(segment))
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)

    async def _save_logged(self, segment: SegmentRecord) -> None:
        try:
            await asyncio.to_thread(self._save, segment)
        except Exception:
            log.exception("saving segment %s of episode %s failed", segment.agent, self.episode_id)

    def _save(self, segment: SegmentRecord) -> None:
        from shared.store import repository

        with self.session_factory() as session:
            repository.save_segment(session, episode_id=self.episode_id, segment=segment)

    async def drain(self) -> None:
        """Wait for every segment write started so far."""
        if self.writer is not None:
            await self.writer.drain(self.episode_id)
        while pending := [w for w in self._writes if not w.done()]:
            await asyncio.gather(*pending, return_exceptions=True)


class StoreCheckpoint:
    """The organizer's checkpoints (:class:`~shared.agents.Checkpointer`) saved as its segment row.

    Each checkpoint is a partial organizer segment (``wall_end`` 0, ``error`` None) with its ids and
    mask, upserted as the episode's ``organizer`` segment; the final ``save_episode`` replaces it with
    the complete one. Writes run in one background task, latest only and debounced: a checkpoint is
    written ``delay_s`` after it arrives, unless a newer one replaced it meanwhile (then the newer one
    is), and only if it holds at least ``min_new_tokens`` generated tokens more than the last one
    written. So the database sees at most one write in flight per episode, never an older checkpoint
    after a newer one, and no write at all for an episode that ends within ``delay_s`` or decodes
    little (its final save comes first). A crash loses at most ``min_new_tokens`` plus ``delay_s`` of
    decoding more than with a write at every fork and join. :meth:`finish` must run before the final
    save: it drops a checkpoint not yet written and waits for one being written (else a late
    checkpoint could replace the complete row).

    The engine hands it :class:`~shared.agents.Snapshot` s (``lazy``): nothing is copied or decoded
    unless a checkpoint is written, and after its first write a checkpoint only appends the ids since
    the previous one (``repository.append_segment``, PostgreSQL; SQLite writes it whole), so a long
    organizer costs the store time linear in its length, not quadratic. The text of an appended
    checkpoint is the concatenation of each piece's decode (a multi-byte character split across two
    pieces reads differently than in the final segment's text); resuming reads the ids only.
    """

    lazy = True

    def __init__(
        self, session_factory: Callable[[], Any], episode_id: str, *, delay_s: float = 0.25, min_new_tokens: int = 32
    ) -> None:
        self.session_factory = session_factory
        self.episode_id = episode_id
        self.delay_s = delay_s
        self.min_new_tokens = min_new_tokens
        self._latest: SegmentRecord | Snapshot | None = None
        self._writer: asyncio.Task[None] | None = None
        self._writing = False
        self._written_tokens = 0  # generated tokens in the last checkpoint written
        self._stored_ids: int | None = None  # completion ids in the row this writer wrote last
        self.saved = 0
        self.appended = 0

    async def checkpoint(self, episode_id: str, segment: SegmentRecord | Snapshot) -> None:
        if episode_id != self.episode_id:
            return
        self._latest = segment
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write())

    async def _write(self) -> None:
        while self._latest is not None:
            await asyncio.sleep(self.delay_s)
            segment, self._latest = self._latest, None
            if segment is None:
                return
            if segment.generated_tokens - self._written_tokens < self.min_new_tokens:
                continue  # too little new work to be worth a write
            self._written_tokens = segment.generated_tokens
            self._writing = True
            try:
                await asyncio.to_thread(self._store, segment)
                self.saved += 1
            except Exception:
                log.exception("saving the checkpoint of episode %s failed", self.episode_id)
                self._stored_ids = None
            finally:
                self._writing = False

    def _store(self, item: SegmentRecord | Snapshot) -> None:
        if not isinstance(item, Snapshot):
            self._save(item)
            self._stored_ids = None
            return
        if self._stored_ids is not None and item.length >= self._stored_ids:
            ids, mask, text = item.tail(self._stored_ids)
            if self._append(item, ids, mask, text):
                self._stored_ids = item.length
                self.appended += 1
                return
        self._save(item.segment())
        self._stored_ids = item.length

    def _append(self, item: Snapshot, ids: list[int], mask: list[int], text: str) -> bool:
        from shared.store import repository

        assert self._stored_ids is not None
        with self.session_factory() as session:
            return repository.append_segment(
                session, episode_id=self.episode_id, agent=item.agent, stored=self._stored_ids, ids=ids,
                mask=mask, text=text, generated_tokens=item.generated_tokens,
            )  # fmt: skip

    def _save(self, segment: SegmentRecord) -> None:
        from shared.store import repository

        with self.session_factory() as session:
            repository.save_segments(session, rows=[(self.episode_id, segment)])

    async def finish(self) -> None:
        """Drop the checkpoint waiting to be written; wait for the one being written, if any."""
        writer, self._latest = self._writer, None
        if writer is None or writer.done():
            return
        if not self._writing:
            writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)


class BusSink:
    """Publishes every event to the episode's event stream (``events_stream(episode_id)``).

    ``background=True``: events are queued and published in order by one task, so an XADD never sits
    between a worker's outcome and the organizer resuming; :meth:`drain` waits until the queue is
    empty. A publish that fails is logged and dropped (events are observations; the store holds the
    record).

    With ``batcher`` (the organizer's choice: one :class:`~shared.bus.redis_streams.CommandBatcher` for
    every episode of the process) each event is queued on the batcher, which sends the events of all
    episodes in shared pipelines in order and retries through a short Redis outage; ``emit`` waits only
    while the batcher's queue is full. :meth:`drain` waits for this sink's last event.
    """

    def __init__(
        self, bus: Bus, *, maxlen: int | None = EVENTS_MAXLEN, background: bool = False, batcher: Any = None
    ) -> None:
        self.bus = bus
        self.maxlen = maxlen
        self.background = background
        self.batcher = batcher
        self._queue: collections.deque[EpisodeEvent] = collections.deque()
        self._pump: asyncio.Task[None] | None = None
        self._last: asyncio.Future[Any] | None = None
        self.failed = 0

    async def _publish(self, event: EpisodeEvent) -> None:
        await self.bus.publish(
            events_stream(event.episode_id), {"data": event.model_dump_json()}, maxlen=self.maxlen
        )

    async def emit(self, event: EpisodeEvent) -> None:
        if self.batcher is not None:
            trim = ("MAXLEN", "~", str(self.maxlen)) if self.maxlen is not None else ()
            fut = await self.batcher.call(
                "XADD", events_stream(event.episode_id), *trim, "*", "data", event.model_dump_json(), urgent=False
            )
            fut.add_done_callback(self._published)
            self._last = fut
            return
        if not self.background:
            await self._publish(event)
            return
        self._queue.append(event)
        if self._pump is None or self._pump.done():
            self._pump = asyncio.create_task(self._run_pump())

    def _published(self, fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            self.failed += 1
            log.error("an event was not published: %s", fut.exception())

    async def _run_pump(self) -> None:
        while self._queue:
            event = self._queue.popleft()
            try:
                await self._publish(event)
            except Exception:
                log.exception("publishing %s of episode %s failed", event.kind, event.episode_id)

    async def drain(self) -> None:
        """Wait until every event emitted so far is published."""
        if self._last is not None:
            if not self._last.done():
                self.batcher.flush()
            await asyncio.wait([self._last])
        while self._pump is not None and not self._pump.done():
            await asyncio.shield(self._pump)


class FanoutSink:
    """Sends each event to every sink in order; one sink's failure does not stop the others."""

    def __init__(self, *sinks: EventSink) -> None:
        self.sinks = sinks

    async def emit(self, event: EpisodeEvent) -> None:
        for sink in self.sinks:
            try:
                await sink.emit(event)
            except Exception:
                log.exception("event sink %s failed on %s of episode %s", type(sink).__name__, event.kind, event.episode_id)

    async def drain(self) -> None:
        """Drain every sink that buffers (those with a ``drain`` method)."""
        for sink in self.sinks:
            drain = getattr(sink, "drain", None)
            if drain is not None:
                await drain()


def engine_config(submission: SubmitProblem, *, worker_timeout_cap_s: float | None = None) -> EngineConfig:
    """The engine configuration a submission asks for; ``worker_timeout_cap_s`` (the operator's limit)
    caps the worker timeout it may ask for."""
    settings = submission.settings
    if worker_timeout_cap_s is not None and settings.worker_timeout_s > worker_timeout_cap_s:
        settings = settings.model_copy(update={"worker_timeout_s": worker_timeout_cap_s})
    return EngineConfig.of(settings)


def build_engine(
    submission: SubmitProblem,
    backend: ModelBackend,
    endpoints: Mapping[str | None, WorkerEndpoint] | None,
    sink: EventSink,
    *,
    worker_timeout_cap_s: float | None = None,
    checkpointer: Checkpointer | None = None,
    recorder: SegmentRecorder | None = None,
) -> Engine:
    """An engine for one submission: its task, its configuration, the given endpoints and sink.

    ``endpoints`` maps ``<FORK-i@endpoint>`` names (``None`` = the model) to worker endpoints; a
    missing ``None`` entry means the model runs workers in this process (``ModelWorker``).
    """
    task = get_task(submission.task)
    config = engine_config(submission, worker_timeout_cap_s=worker_timeout_cap_s)
    return engine_for(  # people: a human organizer, an approved plan
        submission, backend, task, config, endpoints, sink, checkpointer=checkpointer, recorder=recorder
    )


async def events_until_finished(
    bus: Bus, episode_id: str, *, timeout_s: float = 60.0, block_ms: int = 500
) -> list[EpisodeEvent]:
    """Every event of an episode, read from its stream until the ``finished`` one (TimeoutError after
    ``timeout_s`` naming the kinds seen so far)."""
    import time

    events: list[EpisodeEvent] = []
    after = "0"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for entry in await bus.read(events_stream(episode_id), after=after, block_ms=block_ms):
            after = entry.id
            events.append(EpisodeEvent.model_validate_json(entry.fields["data"]))
        if any(e.kind is EventKind.FINISHED for e in events):
            return events
    raise TimeoutError(f"episode {episode_id} did not finish in {timeout_s} s; events: {[e.kind for e in events]}")
