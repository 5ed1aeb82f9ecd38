"""The organizer service: consume submitted problems, run their episodes concurrently, store the traces.

:class:`OrganizerService` reads :class:`~shared.messages.SubmitProblem` entries (field ``data``) from
``PROBLEMS_STREAM`` through the ``ORGANIZER_GROUP`` consumer group and, for each, as its own asyncio
task (at most ``max_concurrent_episodes`` at once):

1. skips an episode the store already has as finished (``completed``, ``format_error``, ``failed``):
   delivery is at-least-once, so a redelivered submission is acked without running again;
2. creates the episode if the gateway did not (a submission written straight to the stream) and marks
   it ``running`` — committed before any worker is dispatched;
3. runs the engine with a sink that saves each worker segment as it completes (:class:`StoreSink`
   through the process's :class:`SegmentWriter`: every episode's segments in shared batches) and
   publishes every event to ``events_stream(episode_id)`` (:class:`BusSink` through the bus's command
   batcher: every episode's events in shared pipelines), both in the background
   so neither a database write nor an XADD sits on the path from a worker's outcome to the join, and
   with a checkpointer that saves the organizer's sequence so far (ids and mask) at each fork and join
   as its partial segment (:class:`StoreCheckpoint`). An episode the store has as ``running`` (its
   organizer died, or lost its lease) resumes from that checkpoint (``Engine.run(resume_from=...)``):
   the organizer continues from its stored prefix, its forks are dispatched again and the workers'
   done-markers hand back the outcomes already computed, so a crash costs only the organizer tokens
   decoded since the last checkpoint and the workers still running. Without a checkpoint (or with
   ``resume=False``) it runs again from the start;
4. saves the finished episode (``save_episode``: the episode row, the organizer's segment, and for the
   workers only what was not stored while it ran: their clock spans), *then* publishes the engine's
   ``finished`` event, so a client that sees ``finished`` can read the stored result; then sets the
   episode's streams and its workers' done-markers to expire ``stream_ttl_s`` later (0: never);
5. acks the entry (retried through a short Redis outage). An entry whose processing raised (the store
   unreachable...) is not acked: it stays pending and is claimed again once its lease runs out.

Backpressure: besides ``max_concurrent_episodes``, the service takes no new submission while its
writes lag (more than ``max_write_backlog`` Redis commands or segment rows queued): episodes then
slow down on their own writes and the queue waits in the stream, where another organizer (or the
gateway's 429) takes the load, instead of this process growing its buffers or failing writes.

Leases (:meth:`shared.bus.base.Bus.renew`): every ``renew_every_ms`` (default a quarter of
``claim_idle_ms``) the service renews the entries it is running, which resets their idle time without
counting a delivery. So an episode may run for any number of lease periods and is never claimed, counted
again or dead-lettered while its organizer lives. On the same period it claims entries idle longer than
``claim_idle_ms`` (XAUTOCLAIM): only a dead (or stalled) organizer's, about one lease after its last
renewal. An entry another organizer claimed while this one stalled is reported missing by the next
renewal: its episode is cancelled here, and a run that ends anyway checks its lease once more before
storing, so the new owner alone stores and acks it. The bus dead-letters an entry after
``bus.max_deliveries`` deliveries (organizers died that many times running it); the service reads the
dead-letter stream and ends those episodes as ``failed`` instead of leaving them ``running``.

Shutdown (``stop_event``, set by SIGTERM in ``__main__``): stop reading, let running episodes finish
for ``shutdown_grace_s``, then cancel the rest, leaving their entries unacked for another organizer.

Limits: a stalled organizer that loses a lease may still be mid-way through the store write of the
same episode when the new owner finishes; both store the same episode id (the last ``save_episode``
wins, and it keeps one set of segments). A submission that can never run (a payload its task
rejects, an unknown mode) is logged and acked; its stored episode, if any, stays ``pending``
(the gateway validates before submitting). Episodes run in this process's event loop, so the engine
and the backend must not block it; a loop blocked longer than a lease loses that loop's leases.
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

from services.runtime import (
    BusSink,
    FanoutSink,
    SegmentWriter,
    StoreCheckpoint,
    StoreSink,
    build_engine,
    engine_config,
)
from shared.backends.base import ModelBackend
from shared.bus.base import Bus, Entry, dead_letter_stream
from shared.engine import EpisodeResult, EventSink, WorkerEndpoint
from shared.messages import (
    ORGANIZER_GROUP,
    PROBLEMS_STREAM,
    EpisodeEvent,
    EpisodeStatus,
    EventKind,
    SegmentRecord,
    SubmitProblem,
    done_key,
    events_stream,
    results_stream,
)
from shared.retry import REDIS_ERRORS, retry_async

log = logging.getLogger(__name__)


DEAD_LETTERS = dead_letter_stream(PROBLEMS_STREAM)
ACK_RETRY_S = 30.0  # how long an ack (after the episode is stored) is retried through a Redis outage
STREAM_TTL_S = 3600.0  # a finished episode's streams and done-markers live this long (0: no expiry)
MAX_WRITE_BACKLOG = 5000  # queued Redis commands or segment rows past which no new episode is taken


class InvalidSubmission(ValueError):
    """A submission that can never run (bad payload for its task): acked and dropped, with a log line."""


class LeaseLost(RuntimeError):
    """Another organizer claimed the entry of an episode this one runs (it stalled past its lease)."""


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


def _checkpoint_of(segments: list[Any]) -> SegmentRecord | None:
    """The organizer's checkpoint among an unfinished episode's stored segments: its partial organizer
    segment (``wall_end`` 0, ids stored), if any."""
    from shared.store import repository

    for row in segments:
        if row.agent == "organizer" and row.role == "organizer" and not row.wall_end and row.completion_ids:
            return repository.segment_record(row)
    return None


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
        claim_idle_ms: int = 10_000,
        renew_every_ms: int | None = None,
        worker_timeout_cap_s: float | None = None,
        read_block_ms: int = 1000,
        shutdown_grace_s: float = 30.0,
        resume: bool = True,
        stream_ttl_s: float = STREAM_TTL_S,
        max_write_backlog: int = MAX_WRITE_BACKLOG,
    ) -> None:
        if max_concurrent_episodes < 1:
            raise ValueError(f"max_concurrent_episodes must be >= 1, got {max_concurrent_episodes}")
        renew_every_ms = renew_every_ms if renew_every_ms is not None else max(claim_idle_ms // 4, 1)
        if not 0 < renew_every_ms * 2 <= claim_idle_ms:
            raise ValueError(
                f"renew_every_ms ({renew_every_ms}) must be at most half of claim_idle_ms ({claim_idle_ms}): "
                "a live organizer must renew its leases well before they run out"
            )
        self.bus = bus
        self.session_factory = session_factory
        self.backend = backend
        # ``<FORK-i@name>`` -> its endpoint; without a None entry the model's workers run in this process.
        self.endpoints: dict[str | None, WorkerEndpoint] = dict(endpoints)
        self.consumer_name = consumer_name or default_consumer_name()
        self.max_concurrent_episodes = max_concurrent_episodes
        self.claim_idle_ms = claim_idle_ms
        self.renew_every_ms = renew_every_ms
        self.worker_timeout_cap_s = worker_timeout_cap_s
        self.read_block_ms = read_block_ms
        self.shutdown_grace_s = shutdown_grace_s
        self.resume = resume
        self.stream_ttl_s = stream_ttl_s
        self.max_write_backlog = max_write_backlog
        self.writer = SegmentWriter(session_factory)
        self.backpressure_waits = 0  # reads postponed because this process's writes lagged
        self._running: dict[str, asyncio.Task[None]] = {}  # entry id -> its task
        self._lost: set[str] = set()  # entry ids claimed by another organizer while running here
        self._bus_failed_at = -1e9  # time.monotonic() of the last failed bus call (claims wait after one)
        self._episodes_in_flight: set[str] = set()
        self.episodes_done = 0
        self.episodes_resumed = 0  # interrupted episodes continued from their organizer's checkpoint
        self.episodes_rerun = 0  # interrupted episodes run again from the start (no checkpoint, or resume off)
        self.leases_lost = 0
        self.dead_letters_failed = 0

    @property
    def in_progress(self) -> int:
        """Submissions being processed now (read, not yet acked or given up)."""
        return len(self._running)

    @property
    def write_backlog(self) -> int:
        """Writes queued in this process: Redis commands (events, task messages) and segment rows."""
        batcher = self._batcher()
        return self.writer.backlog + (batcher.backlog if batcher is not None else 0)

    def _batcher(self) -> Any:
        """The bus's command batcher (Redis), or None (the in-process bus publishes directly)."""
        make = getattr(self.bus, "batcher", None)
        return make() if make is not None else None

    # ------------------------------------------------------------------ the consume loop
    async def run_forever(self, stop_event: asyncio.Event) -> None:
        """Consume the problems stream until ``stop_event`` is set, then shut down gracefully."""
        await self.bus.ensure_group(PROBLEMS_STREAM, ORGANIZER_GROUP)
        await self.bus.ensure_group(DEAD_LETTERS, ORGANIZER_GROUP)
        log.info(
            "organizer %s consuming %s (group %s, up to %d episodes at once, lease %d ms renewed every %d ms)",
            self.consumer_name, PROBLEMS_STREAM, ORGANIZER_GROUP, self.max_concurrent_episodes,
            self.claim_idle_ms, self.renew_every_ms,
        )
        next_claim = 0.0
        stop_wait = asyncio.create_task(stop_event.wait())
        renewer = asyncio.create_task(self._renew_forever(), name=f"lease-renewer-{self.consumer_name}")
        try:
            while not stop_event.is_set():
                free = self.max_concurrent_episodes - len(self._running)
                if free <= 0:
                    await asyncio.wait([stop_wait, *self._running.values()], return_when=asyncio.FIRST_COMPLETED)
                    continue
                if self.write_backlog > self.max_write_backlog:  # take fewer episodes while writes lag
                    self.backpressure_waits += 1
                    await asyncio.wait([stop_wait], timeout=0.05)
                    continue
                entries: list[Entry] = []
                if time.monotonic() >= next_claim and await self._may_claim():
                    next_claim = time.monotonic() + self.renew_every_ms / 1000
                    entries = await self._safely(
                        self.bus.claim_stale(
                            PROBLEMS_STREAM, ORGANIZER_GROUP, self.consumer_name,
                            min_idle_ms=self.claim_idle_ms, count=free,
                        )
                    )
                    for e in entries:
                        log.warning(
                            "claimed submission %s of a dead organizer (idle over %d ms; delivery %d)",
                            e.id, self.claim_idle_ms, e.deliveries,
                        )
                    await self._reap_dead_letters()
                if not entries:
                    read = asyncio.create_task(
                        self.bus.read_group(
                            PROBLEMS_STREAM, ORGANIZER_GROUP, self.consumer_name,
                            count=free, block_ms=min(self.read_block_ms, self.renew_every_ms),
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
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)

    # ------------------------------------------------------------------ leases
    async def _renew_forever(self) -> None:
        """Every ``renew_every_ms``: renew the lease of every entry running here; stop those lost."""
        while True:
            await asyncio.sleep(self.renew_every_ms / 1000)
            await self.renew_leases()

    async def renew_leases(self) -> bool:
        """Renew this organizer's running entries; an entry another organizer claimed meanwhile (this
        one stalled past its lease) is stopped here: the new owner runs (or resumes) its episode.
        Returns False when Redis could not be asked."""
        ids = [i for i, t in self._running.items() if not t.done() and i not in self._lost]
        if not ids:
            return True
        try:
            owned = set(await self.bus.renew(PROBLEMS_STREAM, ORGANIZER_GROUP, self.consumer_name, *ids))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Redis down: keep running; the next renewal tells what is still ours
            self._bus_failed_at = time.monotonic()
            log.warning("organizer %s: renewing %d leases failed: %s", self.consumer_name, len(ids), exc)
            return False
        for entry_id in ids:
            task = self._running.get(entry_id)
            if entry_id in owned or task is None or task.done():
                continue
            self._lost.add(entry_id)
            self.leases_lost += 1
            log.warning(
                "organizer %s lost the lease of submission %s (another organizer claimed it after this one "
                "stalled past %d ms); stopping its episode here", self.consumer_name, entry_id, self.claim_idle_ms,
            )
            task.cancel()
        return True

    async def _still_owner(self, entry_id: str) -> bool:
        """Whether this organizer still holds ``entry_id`` (renewing it); True when Redis cannot tell."""
        try:
            return bool(await self.bus.renew(PROBLEMS_STREAM, ORGANIZER_GROUP, self.consumer_name, entry_id))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("checking the lease of %s failed (%s); storing the episode anyway", entry_id, exc)
            return True

    # ------------------------------------------------------------------ dead letters
    async def _reap_dead_letters(self) -> None:
        """End the episode of every dead-lettered submission as ``failed`` (it would stay ``running``)."""
        try:
            entries = await self.bus.claim_stale(
                DEAD_LETTERS, ORGANIZER_GROUP, self.consumer_name, min_idle_ms=self.claim_idle_ms, count=16
            )
            entries += await self.bus.read_group(DEAD_LETTERS, ORGANIZER_GROUP, self.consumer_name, count=16, block_ms=0)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._bus_failed_at = time.monotonic()
            log.warning("reading %s failed: %s", DEAD_LETTERS, exc)
            return
        for entry in entries:
            try:
                await asyncio.to_thread(self._fail_dead_letter, entry)
                await self.bus.ack(DEAD_LETTERS, ORGANIZER_GROUP, entry.id)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("handling dead letter %s failed; it stays pending", entry.id)

    def _fail_dead_letter(self, entry: Entry) -> None:
        from shared.store import repository

        deliveries = entry.fields.get("dead_deliveries", "?")
        try:
            submission = SubmitProblem.model_validate_json(entry.fields.get("data", ""))
        except ValidationError:
            log.error("dead letter %s holds no valid submission; dropped", entry.id)
            return
        error = (
            f"dead-lettered after {deliveries} deliveries: organizers died {deliveries} times while running "
            "this episode"
        )
        try:
            problem = self._problem(submission)
        except InvalidSubmission:
            problem = None
        with self.session_factory() as session:
            if problem is not None and repository.get_episode(session, submission.episode_id) is None:
                self._create(session, submission, problem)
            changed = repository.mark_failed(session, episode_id=submission.episode_id, error=error)
        if changed:
            self.dead_letters_failed += 1
            log.error("episode %s failed: its submission %s was %s", submission.episode_id, entry.fields.get("dead_id"), error)

    async def _may_claim(self) -> bool:
        """Whether to sweep for stale entries now: only right after renewing this organizer's own leases,
        and only once Redis has answered for half a lease since its last failure, so that after an
        outage (when every lease looks stale) the other live organizers renew theirs before anyone
        sweeps, and nobody takes a live organizer's episodes."""
        if not await self.renew_leases():
            return False
        return time.monotonic() - self._bus_failed_at > self.claim_idle_ms / 2000

    async def _safely(self, aw: Any) -> list[Entry]:
        try:
            return list(await aw)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._bus_failed_at = time.monotonic()
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
            await self._ack(entry.id)
            return
        while submission.episode_id in self._episodes_in_flight:
            # A second submission of an episode running here: keep it (renewed) until the run ends,
            # then handle it, which finds the episode finished and acks it.
            await asyncio.sleep(0.2)
        try:
            await self.handle(submission, entry_id=entry.id)
        except asyncio.CancelledError:
            if entry.id in self._lost:
                return  # another organizer owns it now
            raise
        except InvalidSubmission as exc:
            log.error("dropping submission %s of episode %s: %s", entry.id, submission.episode_id, exc)
            await self._ack(entry.id)
            return
        except LeaseLost as exc:
            log.warning("%s", exc)
            return
        except Exception:
            log.exception("episode %s (entry %s) failed; left pending for redelivery", submission.episode_id, entry.id)
            return
        finally:
            self._lost.discard(entry.id)
        await self._ack(entry.id)

    async def _ack(self, entry_id: str) -> None:
        """Ack, retried through a short Redis outage (an unacked entry would run again after its lease)."""
        await retry_async(
            f"acking submission {entry_id}",
            lambda: self.bus.ack(PROBLEMS_STREAM, ORGANIZER_GROUP, entry_id),
            retry_on=REDIS_ERRORS,
            budget_s=ACK_RETRY_S,
            logger=log,
        )

    # ------------------------------------------------------------------ one episode
    async def handle(self, submission: SubmitProblem, *, entry_id: str | None = None) -> EpisodeResult | None:
        """Run one submitted episode end to end; None if the store already has it finished.

        With ``entry_id`` (the stream entry it came in), the result is stored only while this
        organizer still holds that entry's lease (:class:`LeaseLost` otherwise)."""
        eid = submission.episode_id
        self._episodes_in_flight.add(eid)
        try:
            return await self._handle(submission, entry_id)
        finally:
            self._episodes_in_flight.discard(eid)

    @staticmethod
    def _problem(submission: SubmitProblem) -> Any:
        from shared.tasks import get_task

        try:
            problem = get_task(submission.task).problem_from_payload(submission.payload, submission.problem_id)
            engine_config(submission)
        except (ValueError, KeyError) as exc:
            raise InvalidSubmission(str(exc)) from exc
        return problem

    async def _handle(self, submission: SubmitProblem, entry_id: str | None) -> EpisodeResult | None:
        eid = submission.episode_id
        problem = self._problem(submission)
        prepared = await asyncio.to_thread(self._prepare, submission, problem)
        if prepared is None:
            log.info("episode %s already finished in the store; skipping the redelivered submission", eid)
            return None
        checkpoint = prepared[0] if self.resume else None
        store = StoreSink(self.session_factory, eid, writer=self.writer)
        sinks = FanoutSink(store, BusSink(self.bus, background=True, batcher=self._batcher()))
        hold = _HoldFinished(sinks)
        checkpointer = StoreCheckpoint(self.session_factory, eid) if self.resume else None
        engine = build_engine(
            submission, self.backend, self.endpoints, hold, worker_timeout_cap_s=self.worker_timeout_cap_s,
            checkpointer=checkpointer, recorder=store,
        )
        if checkpoint is not None:
            self.episodes_resumed += 1
            log.warning(
                "episode %s resumed: the organizer continues from %d tokens it had decoded (%d joined results "
                "in its prefix) instead of from its prompt",
                eid, checkpoint.generated_tokens, checkpoint.text.count("</JOIN-"),
            )
        elif prepared[1]:
            self.episodes_rerun += 1
            log.warning("episode %s was left running by an organizer that stopped; running it again from the start", eid)
        log.info(
            "episode %s started: task %s, mode %s, capacity %d",
            eid, submission.task, submission.settings.mode.value, engine.capacity,
        )
        try:
            result = await engine.run(problem, episode_id=eid, resume_from=checkpoint)
            config = submission.stored_config()
            await sinks.drain()  # live segment writes land before the final save
            if checkpointer is not None:
                await checkpointer.finish()  # ... and no checkpoint lands after it
            live = self.writer.forget(eid)
        finally:
            self.writer.forget(eid)
        if entry_id is not None and not await self._still_owner(entry_id):
            raise LeaseLost(
                f"episode {eid} ran to its end here, but another organizer claimed its submission {entry_id}; "
                "leaving the result to it"
            )
        await asyncio.to_thread(self._save, result, config, live)
        self.episodes_done += 1
        if hold.finished is not None:
            await sinks.emit(hold.finished)
        await sinks.drain()
        self._expire(eid, result)
        log.info(
            "episode %s %s: answer=%r T=%d eta=%.3f forks=%d wall=%.3fs%s",
            eid, result.status, result.answer, result.latency, result.eta, result.forks, result.wall_time_s,
            f" error={result.error}" if result.error else "",
        )
        return result

    def _prepare(self, submission: SubmitProblem, problem: Any) -> tuple[SegmentRecord | None, bool] | None:
        """Create (if missing) and mark the episode running. None if it is already finished; else the
        organizer's checkpoint of an interrupted run (if it has one) and whether it was running already."""
        from shared.store import repository
        from shared.tasks import get_task

        checkpoint: SegmentRecord | None = None
        capacity = submission.settings.resolved_capacity(get_task(submission.task).default_capacity)
        with self.session_factory() as session:
            before = repository.start_episode(
                session, episode_id=submission.episode_id, problem=problem, mode=submission.settings.mode,
                capacity=capacity, model_id=self.backend.model_id, config=submission.stored_config(),
                model_version=self.backend.weight_version,
            )  # fmt: skip
            if before is not None and before.finished:
                return None
            was_running = before is EpisodeStatus.RUNNING
            if was_running and self.resume:
                checkpoint = _checkpoint_of(repository.episode_segments(session, submission.episode_id))
        return checkpoint, was_running

    def _create(self, session: Any, submission: SubmitProblem, problem: Any) -> None:
        """Store the episode of a submission written straight to the stream (the gateway stores it first)."""
        from shared.store import repository
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

    def _save(self, result: EpisodeResult, config: dict[str, Any], live: set[str] | None = None) -> None:
        from shared.store import repository

        with self.session_factory() as session:
            repository.store_episode(session, result=result, config=config, live_agents=live or ())

    def _expire(self, episode_id: str, result: EpisodeResult) -> None:
        """Let a finished episode's event and result streams and its workers' done-markers go after
        ``stream_ttl_s`` (readers that come later get the stored episode)."""
        if self.stream_ttl_s <= 0:
            return
        ttl = str(max(1, round(self.stream_ttl_s)))
        batcher = self._batcher()
        if batcher is None:
            for stream in (events_stream(episode_id), results_stream(episode_id)):
                task = asyncio.get_running_loop().create_task(self.bus.expire(stream, self.stream_ttl_s))
                task.add_done_callback(lambda t: t.cancelled() or t.exception())
            return
        batcher.fire("EXPIRE", events_stream(episode_id), ttl, urgent=False)
        batcher.fire("EXPIRE", results_stream(episode_id), ttl, urgent=False)
        for seg in result.segments:
            if seg.role == "worker":
                batcher.fire("EXPIRE", done_key(episode_id, seg.agent), ttl, urgent=False)
