"""Glue shared by the embedded and the distributed setups: event sinks and the engine factory.

* :class:`StoreSink` persists each worker segment as soon as its ``segment`` event arrives
  (``repository.save_segment``), in a thread (``asyncio.to_thread``) so the event loop never waits on
  the database; in background mode the write does not delay the episode at all. A segment is unique per ``(episode_id, agent)`` in the store, so a repeated event (a
  redelivered worker, a recursive child reported twice) replaces the row instead of duplicating it.
* :class:`BusSink` publishes every :class:`~shared.messages.EpisodeEvent` as JSON (field ``data``) to
  ``events_stream(episode_id)``, where the gateway's SSE endpoint tails it.
* :class:`FanoutSink` sends one event to several sinks; a failing sink is logged and skipped.
* :class:`StoreCheckpoint` saves the organizer's checkpoints (its partial sequence with ids and mask, at
  each fork and join) as the episode's organizer segment, so a restarted organizer can resume it.
* :func:`build_engine` turns a :class:`~shared.messages.SubmitProblem` into an :class:`Engine`.
* :func:`open_service_backend` opens the model backend of a service process:
  ``shared.backends.registry.open_backend(settings.model, settings)``, unless the environment variable
  ``ASYNCTHINK_BACKEND_FACTORY=module:attr`` names a factory ``(settings) -> backend``. That hook is for
  tests and benchmarks (the scenario suite's scripted backend); nothing sets it by default.

Limits: the ``segment`` event carries no token ids (the engine leaves them out to keep events small),
so a segment stored live has its text and metadata but empty id lists; the organizer's final
``save_episode`` writes every segment again with its ids, masks and clock span. Events are
best-effort observations: a sink error never fails an episode (the engine swallows it too).
"""

from __future__ import annotations

import asyncio
import collections
import importlib
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from services.human.engine import engine_for
from shared.backends.base import ModelBackend
from shared.bus.base import Bus
from shared.config import Settings
from shared.engine import Checkpointer, Engine, EngineConfig, EventSink, WorkerEndpoint
from shared.messages import EpisodeEvent, EventKind, SegmentRecord, SubmitProblem, events_stream
from shared.tasks import get_task

log = logging.getLogger(__name__)

EVENTS_MAXLEN = 10_000  # approximate cap on one episode's event stream
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


class StoreSink:
    """Saves each worker segment to the store as it completes (``segment`` events only).

    ``background=True`` (the organizer's choice): ``emit`` starts the write in a thread and returns at
    once, so a database round trip never delays the join waiting for that worker; :meth:`drain` waits
    for the writes and must run before the final ``save_episode`` (else a late live write, which has
    no token ids, could replace the complete row).
    """

    def __init__(self, session_factory: Callable[[], Any], episode_id: str, *, background: bool = False) -> None:
        self.session_factory = session_factory
        self.episode_id = episode_id
        self.background = background
        self._writes: set[asyncio.Task[None]] = set()

    async def emit(self, event: EpisodeEvent) -> None:
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
    little (its final save comes first): a checkpoint costs an upsert of the whole sequence, which
    short episodes would pay for nothing. A crash loses at most ``min_new_tokens`` plus ``delay_s`` of
    decoding more than with a write at every fork and join. :meth:`finish` must run before the final
    save: it drops a checkpoint not yet written and waits for one being written (else a late
    checkpoint could replace the complete row).
    """

    def __init__(
        self, session_factory: Callable[[], Any], episode_id: str, *, delay_s: float = 0.25, min_new_tokens: int = 32
    ) -> None:
        self.session_factory = session_factory
        self.episode_id = episode_id
        self.delay_s = delay_s
        self.min_new_tokens = min_new_tokens
        self._latest: SegmentRecord | None = None
        self._writer: asyncio.Task[None] | None = None
        self._writing = False
        self._written_tokens = 0  # generated tokens in the last checkpoint written
        self.saved = 0

    async def checkpoint(self, episode_id: str, segment: SegmentRecord) -> None:
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
                await asyncio.to_thread(self._save, segment)
                self.saved += 1
            except Exception:
                log.exception("saving the checkpoint of episode %s failed", self.episode_id)
            finally:
                self._writing = False

    def _save(self, segment: SegmentRecord) -> None:
        from shared.store import repository

        with self.session_factory() as session:
            repository.save_segment(session, episode_id=self.episode_id, segment=segment)

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

    ``background=True`` (the organizer's choice): events are queued and published in order by one
    task, so an XADD never sits between a worker's outcome and the organizer resuming; :meth:`drain`
    waits until the queue is empty. A publish that fails is logged and dropped (events are
    observations; the store holds the record).
    """

    def __init__(self, bus: Bus, *, maxlen: int | None = EVENTS_MAXLEN, background: bool = False) -> None:
        self.bus = bus
        self.maxlen = maxlen
        self.background = background
        self._queue: collections.deque[EpisodeEvent] = collections.deque()
        self._pump: asyncio.Task[None] | None = None

    async def _publish(self, event: EpisodeEvent) -> None:
        await self.bus.publish(
            events_stream(event.episode_id), {"data": event.model_dump_json()}, maxlen=self.maxlen
        )

    async def emit(self, event: EpisodeEvent) -> None:
        if not self.background:
            await self._publish(event)
            return
        self._queue.append(event)
        if self._pump is None or self._pump.done():
            self._pump = asyncio.create_task(self._run_pump())

    async def _run_pump(self) -> None:
        while self._queue:
            event = self._queue.popleft()
            try:
                await self._publish(event)
            except Exception:
                log.exception("publishing %s of episode %s failed", event.kind, event.episode_id)

    async def drain(self) -> None:
        """Wait until every event emitted so far is published."""
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
) -> Engine:
    """An engine for one submission: its task, its configuration, the given endpoints and sink.

    ``endpoints`` maps ``<FORK-i@endpoint>`` names (``None`` = the model) to worker endpoints; a
    missing ``None`` entry means the model runs workers in this process (``ModelWorker``).
    """
    task = get_task(submission.task)
    config = engine_config(submission, worker_timeout_cap_s=worker_timeout_cap_s)
    return engine_for(  # people: a human organizer, an approved plan
        submission, backend, task, config, endpoints, sink, checkpointer=checkpointer
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
