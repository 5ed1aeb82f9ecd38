"""The organizer service: consume submitted problems, run their episodes concurrently, store the traces.

:class:`OrganizerService` reads :class:`~shared.messages.SubmitProblem` entries (field ``data``) from
``PROBLEMS_STREAM`` through the ``ORGANIZER_GROUP`` consumer group and, for each, as its own asyncio
task (at most ``max_concurrent_episodes`` at once):

1. skips an episode the store already has as finished (``completed``, ``format_error``, ``failed``):
   delivery is at-least-once, so a redelivered submission is acked without running again;
2. creates the episode if the gateway did not (a submission written straight to the stream) and marks
   it ``running`` — committed before any worker is dispatched;
3. runs the engine with a sink that saves each worker segment as it completes (:class:`StoreSink`) and
   publishes every event to ``events_stream(episode_id)`` (:class:`BusSink`), both in the background
   so neither a database write nor an XADD sits on the path from a worker's outcome to the join;
4. saves the finished episode (``save_episode``: the episode row and every segment with its token ids
   and masks), *then* publishes the engine's ``finished`` event, so a client that sees ``finished``
   can read the stored result;
5. acks the entry. An entry whose processing raised (the store unreachable...) is not acked: it stays
   pending and another organizer claims it.

Every ``claim_idle_ms`` / 2 the service claims entries idle longer than ``claim_idle_ms`` (XAUTOCLAIM),
i.e. those of a dead organizer; the bus dead-letters an entry after ``bus.max_deliveries``. An episode
left ``running`` by a dead organizer is run again from the start; its workers' done-markers make the
re-dispatched forks return the outcomes already computed.

Shutdown (``stop_event``, set by SIGTERM in ``__main__``): stop reading, let running episodes finish
for ``shutdown_grace_s``, then cancel the rest, leaving their entries unacked for another organizer.

Limits: ``claim_idle_ms`` must exceed the longest episode, because a claimed entry of a live but slow
organizer runs twice (the bus interface has no way to renew a claim); both runs store the same
episode id, the last ``save_episode`` wins. A submission that can never run (a payload its task
rejects, an unknown mode) is logged and acked; its stored episode, if any, stays ``pending``
(the gateway validates before submitting). Episodes run in this process's event loop, so the engine
and the backend must not block it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from services.runtime import BusSink, FanoutSink, StoreSink, build_engine, engine_config
from shared.backends.base import ModelBackend
from shared.bus.base import Bus, Entry
from shared.engine import EpisodeResult, EventSink, WorkerEndpoint
from shared.messages import ORGANIZER_GROUP, PROBLEMS_STREAM, EpisodeEvent, EventKind, SubmitProblem

log = logging.getLogger(__name__)


class InvalidSubmission(ValueError):
    """A submission that can never run (bad payload for its task): acked and dropped, with a log line."""


class _HoldFinished:
    """Forwards every event but ``finished``, which it keeps until the episode is stored."""

    def __init__(self, sink: EventSink) -> None:
        self.sink = sink
        self.finished: EpisodeEvent | None = None

    async def emit(self, event: EpisodeEvent) -> None:
        if event.kind is EventKind.FINISHED:
            self.finished = event
            return
        await self.sink.emit(event)


def default_consumer_name() -> str:
    return f"organizer-{socket.gethostname()}-{os.getpid()}"


class OrganizerService:
    """Runs submitted episodes from the problems stream (see the module docstring)."""

    def __init__(
        self,
        bus: Bus,
        session_factory: Callable[[], Any],
        backend: ModelBackend,
        *,
        endpoints: Mapping[str | None, WorkerEndpoint],
        consumer_name: str | None = None,
        max_concurrent_episodes: int = 64,
        claim_idle_ms: int = 30_000,
        worker_timeout_cap_s: float | None = None,
        read_block_ms: int = 1000,
        shutdown_grace_s: float = 30.0,
    ) -> None:
        if max_concurrent_episodes < 1:
            raise ValueError(f"max_concurrent_episodes must be >= 1, got {max_concurrent_episodes}")
        self.bus = bus
        self.session_factory = session_factory
        self.backend = backend
        # ``<FORK-i@name>`` -> its endpoint; without a None entry the model's workers run in this process.
        self.endpoints: dict[str | None, WorkerEndpoint] = dict(endpoints)
        self.consumer_name = consumer_name or default_consumer_name()
        self.max_concurrent_episodes = max_concurrent_episodes
        self.claim_idle_ms = claim_idle_ms
        self.worker_timeout_cap_s = worker_timeout_cap_s
        self.read_block_ms = read_block_ms
        self.shutdown_grace_s = shutdown_grace_s
        self._running: dict[str, asyncio.Task[None]] = {}  # entry id -> its task
        self._episodes_in_flight: set[str] = set()
        self.episodes_done = 0

    @property
    def in_progress(self) -> int:
        """Submissions being processed now (read, not yet acked or given up)."""
        return len(self._running)

    # ------------------------------------------------------------------ the consume loop
    async def run_forever(self, stop_event: asyncio.Event) -> None:
        """Consume the problems stream until ``stop_event`` is set, then shut down gracefully."""
        await self.bus.ensure_group(PROBLEMS_STREAM, ORGANIZER_GROUP)
        log.info(
            "organizer %s consuming %s (group %s, up to %d episodes at once)",
            self.consumer_name, PROBLEMS_STREAM, ORGANIZER_GROUP, self.max_concurrent_episodes,
        )
        next_claim = 0.0
        stop_wait = asyncio.create_task(stop_event.wait())
        try:
            while not stop_event.is_set():
                free = self.max_concurrent_episodes - len(self._running)
                if free <= 0:
                    await asyncio.wait([stop_wait, *self._running.values()], return_when=asyncio.FIRST_COMPLETED)
                    continue
                entries: list[Entry] = []
                if time.monotonic() >= next_claim:
                    next_claim = time.monotonic() + self.claim_idle_ms / 2000
                    entries = await self._safely(
                        self.bus.claim_stale(
                            PROBLEMS_STREAM, ORGANIZER_GROUP, self.consumer_name,
                            min_idle_ms=self.claim_idle_ms, count=free,
                        )
                    )
                    for e in entries:
                        log.warning("claimed stale submission %s (delivery %d)", e.id, e.deliveries)
                if not entries:
                    read = asyncio.create_task(
                        self.bus.read_group(
                            PROBLEMS_STREAM, ORGANIZER_GROUP, self.consumer_name,
                            count=free, block_ms=self.read_block_ms,
                        )
                    )
                    await asyncio.wait([read, stop_wait], return_when=asyncio.FIRST_COMPLETED)
                    if not read.done():
                        read.cancel()  # stopping: what it would have read stays in the stream
                        await asyncio.gather(read, return_exceptions=True)
                        break
                    entries = await self._safely(read)
                for entry in entries:
                    self._start(entry)
        finally:
            stop_wait.cancel()
            await self._drain()

    async def _safely(self, aw: Any) -> list[Entry]:
        try:
            return list(await aw)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("reading %s failed: %s; retrying in 1 s", PROBLEMS_STREAM, exc)
            await asyncio.sleep(1.0)
            return []

    def _start(self, entry: Entry) -> None:
        if entry.id in self._running:
            return
        task = asyncio.create_task(self._process(entry), name=f"episode-entry-{entry.id}")
        self._running[entry.id] = task
        entry_id = entry.id

        def done(_t: asyncio.Task[None]) -> None:
            self._running.pop(entry_id, None)

        task.add_done_callback(done)

    async def _drain(self) -> None:
        if not self._running:
            return
        log.info("organizer %s stopping: waiting up to %.0fs for %d episodes", self.consumer_name, self.shutdown_grace_s, len(self._running))
        _, pending = await asyncio.wait(list(self._running.values()), timeout=self.shutdown_grace_s)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
            log.warning("organizer %s: %d episodes cancelled at shutdown, left for redelivery", self.consumer_name, len(pending))

    async def _process(self, entry: Entry) -> None:
        try:
            submission = SubmitProblem.model_validate_json(entry.fields.get("data", ""))
        except ValidationError as exc:
            log.error("dropping malformed submission %s: %s", entry.id, exc)
            await self.bus.ack(PROBLEMS_STREAM, ORGANIZER_GROUP, entry.id)
            return
        if submission.episode_id in self._episodes_in_flight:
            log.info("episode %s is already running here; leaving entry %s pending", submission.episode_id, entry.id)
            return
        try:
            await self.handle(submission)
        except asyncio.CancelledError:
            raise
        except InvalidSubmission as exc:
            log.error("dropping submission %s of episode %s: %s", entry.id, submission.episode_id, exc)
            await self.bus.ack(PROBLEMS_STREAM, ORGANIZER_GROUP, entry.id)
            return
        except Exception:
            log.exception("episode %s (entry %s) failed; left pending for redelivery", submission.episode_id, entry.id)
            return
        await self.bus.ack(PROBLEMS_STREAM, ORGANIZER_GROUP, entry.id)

    # ------------------------------------------------------------------ one episode
    async def handle(self, submission: SubmitProblem) -> EpisodeResult | None:
        """Run one submitted episode end to end; None if the store already has it finished."""
        eid = submission.episode_id
        self._episodes_in_flight.add(eid)
        try:
            return await self._handle(submission)
        finally:
            self._episodes_in_flight.discard(eid)

    async def _handle(self, submission: SubmitProblem) -> EpisodeResult | None:
        eid = submission.episode_id
        from shared.tasks import get_task

        try:
            problem = get_task(submission.task).problem_from_payload(submission.payload, submission.problem_id)
            engine_config(submission)
        except ValueError as exc:
            raise InvalidSubmission(str(exc)) from exc
        if not await asyncio.to_thread(self._prepare, submission, problem):
            log.info("episode %s already finished in the store; skipping the redelivered submission", eid)
            return None
        sinks = FanoutSink(
            StoreSink(self.session_factory, eid, background=True), BusSink(self.bus, background=True)
        )
        hold = _HoldFinished(sinks)
        engine = build_engine(
            submission, self.backend, self.endpoints, hold, worker_timeout_cap_s=self.worker_timeout_cap_s
        )
        log.info(
            "episode %s started: task %s, mode %s, capacity %d",
            eid, submission.task, submission.settings.mode.value, engine.capacity,
        )
        result = await engine.run(problem, episode_id=eid)
        config = submission.stored_config()
        await sinks.drain()  # live segment writes land before the complete ones
        await asyncio.to_thread(self._save, result, config)
        self.episodes_done += 1
        if hold.finished is not None:
            await sinks.emit(hold.finished)
        await sinks.drain()
        log.info(
            "episode %s %s: answer=%r T=%d eta=%.3f forks=%d wall=%.3fs%s",
            eid, result.status, result.answer, result.latency, result.eta, result.forks, result.wall_time_s,
            f" error={result.error}" if result.error else "",
        )
        return result

    def _prepare(self, submission: SubmitProblem, problem: Any) -> bool:
        """Create (if missing) and mark the episode running; False if it is already finished."""
        from shared.store import repository

        with self.session_factory() as session:
            episode = repository.get_episode(session, submission.episode_id)
            if episode is not None and repository.is_finished(episode):
                return False
            if episode is None:
                from shared.tasks import get_task

                capacity = submission.settings.resolved_capacity(get_task(submission.task).default_capacity)
                repository.create_episode(
                    session,
                    episode_id=submission.episode_id,
                    problem=problem,
                    mode=submission.settings.mode,
                    capacity=capacity,
                    model_id=self.backend.model_id,
                    config=submission.stored_config(),
                )
            repository.mark_running(
                session, episode_id=submission.episode_id, model_version=self.backend.weight_version
            )
        return True

    def _save(self, result: EpisodeResult, config: dict[str, Any]) -> None:
        from shared.store import repository

        with self.session_factory() as session:
            repository.save_episode(session, result=result, config=config)
