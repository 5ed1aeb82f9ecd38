"""The human worker endpoint: ``<FORK-i@human>`` becomes a task in the store's human queue, and its join
waits for a person's answer like any worker's.

:class:`HumanWorkerEndpoint` is a :class:`~shared.agents.WorkerEndpoint`. ``run(task)``:

1. creates the task (``open``, in the pool that ``@human:POOL`` names, ``default`` for ``@human``) with
   its deadline, or finds the one stored for ``(episode, agent)`` when an episode is run again;
2. waits while people claim, renew, release and submit through the gateway's pages. One watcher per
   endpoint serves every waiting join: it wakes on each queue notice (or every ``poll_s``), requeues
   lapsed claims, lets each join consume a submitted answer once its undo window is over, and sends a
   task whose deadline passed to its fallback (all conditional updates of :mod:`shared.store.people`,
   so however many organizers watch, each change happens once);
3. returns the answer: a segment written by a person (``author="human"``, no token ids, no tokens on the
   organizer clock: a person's time is wall time), or the fallback's outcome: a **model** worker given the
   sub-query together with the person's partial answer, a **default** text, or an **error** text.

The deadline is the configured one, capped below the episode's worker timeout (the engine gives up on
any worker after it) so that the fallback still has time: 80 % of it for a model fallback, 98 % for the
others. When the engine cancels the join (the organizer answered without it, or timed out), the task is
marked ``cancelled`` and leaves the inbox.

Limits: the watcher polls the store every ``poll_s`` while joins wait (a few indexed queries per waiting
task); a person's answer reaches the join within one poll after its undo window.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from services.human.notices import QUEUE_STREAM, notice, publish_notice, recent_id
from shared.agents import WorkerEndpoint, failed_outcome, worker_segment
from shared.bus.base import Bus
from shared.config import Settings
from shared.messages import WorkerOutcome, WorkerTask

log = logging.getLogger(__name__)

HUMAN = "human"
DEFAULT_POOL = "default"


def pool_of(endpoint: str | None) -> str:
    """``human`` -> ``default``; ``human:experts`` -> ``experts``."""
    _, _, pool = (endpoint or "").partition(":")
    return pool or DEFAULT_POOL


@dataclass(frozen=True)
class HumanQueueConfig:
    """The human queue's clocks and fallback (``ASYNCTHINK_HUMAN_*``, see :mod:`shared.config`)."""

    pools: tuple[str, ...] = ()  # named pools besides "default"
    lease_s: float = 30.0
    deadline_s: float = 600.0
    fallback: str = "model"  # model | default | error
    fallback_text: str = "[no answer from a person in time]"
    undo_s: float = 5.0
    poll_s: float = 0.5
    organizer_idle_s: float = 1800.0

    @classmethod
    def from_settings(cls, settings: Settings) -> HumanQueueConfig:
        return cls(
            pools=tuple(settings.pools), lease_s=settings.human_lease_s, deadline_s=settings.human_deadline_s,
            fallback=settings.human_fallback, fallback_text=settings.human_fallback_text,
            undo_s=settings.human_undo_s, poll_s=settings.human_poll_s,
            organizer_idle_s=settings.human_organizer_idle_s,
        )

    def endpoint_names(self) -> list[str]:
        return [HUMAN, *(f"{HUMAN}:{p}" for p in self.pools)]

    def deadline_for(self, worker_timeout_s: float) -> float:
        """Seconds from the fork to the deadline: the configured one, leaving the fallback time to run
        before the engine's worker timeout."""
        share = 0.8 if self.fallback == "model" else 0.98
        settle = 2 * self.poll_s + 1.0  # a watcher notices the deadline within a poll
        return max(0.5, min(self.deadline_s, worker_timeout_s * share, worker_timeout_s - settle))


def fallback_query(query: str, partial: str | None) -> str:
    """What the model fallback is asked: the sub-query, and the person's partial answer to go on from."""
    partial = (partial or "").strip()
    if not partial:
        return query
    return (
        f"{query.strip()}\n\nA person started on this and did not finish in time. Their partial answer:\n"
        f"{partial}\nContinue from it."
    )


class _Watcher:
    """Settles every waiting human task of one endpoint (see the module docstring)."""

    def __init__(self, endpoint: HumanWorkerEndpoint) -> None:
        self.ep = endpoint
        self.waiters: dict[str, asyncio.Future[Any]] = {}
        self.task: asyncio.Task[None] | None = None

    def wait(self, task_id: str) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiters[task_id] = fut
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._loop(), name="human-queue-watcher")
        return fut

    def discard(self, task_id: str, fut: asyncio.Future[Any]) -> None:
        if self.waiters.get(task_id) is fut:
            del self.waiters[task_id]

    async def _loop(self) -> None:
        after = recent_id()
        poll_ms = max(1, int(self.ep.config.poll_s * 1000))
        while self.waiters:
            try:
                entries = await self.ep.bus.read(QUEUE_STREAM, after=after, count=200, block_ms=poll_ms)
                if entries:
                    after = entries[-1].id
            except Exception as exc:  # the bus is down: poll the store on the clock alone
                log.warning("reading %s failed (%s); polling the store", QUEUE_STREAM, exc)
                await asyncio.sleep(self.ep.config.poll_s)
            ids = [tid for tid, fut in self.waiters.items() if not fut.done()]
            if not ids:
                continue
            try:
                settled, notices = await asyncio.to_thread(self.ep.settle, ids)
            except Exception:
                log.exception("settling human tasks failed; retrying")
                await asyncio.sleep(self.ep.config.poll_s)
                continue
            for data in notices:
                await publish_notice(self.ep.bus, data)
            for task_id, row in settled.items():
                fut = self.waiters.pop(task_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(row)


class HumanWorkerEndpoint:
    """A :class:`~shared.agents.WorkerEndpoint` backed by the store's human queue (see the module docstring).

    ``model`` is the worker endpoint a model fallback runs on (the Celery model queue in the distributed
    setup, an in-process model worker in the embedded one); None: a model fallback returns an error text.
    """

    def __init__(
        self,
        session_factory: Callable[[], Any],
        bus: Bus,
        config: HumanQueueConfig | None = None,
        *,
        model: WorkerEndpoint | None = None,
    ) -> None:
        self.session_factory = session_factory
        self.bus = bus
        self.config = config or HumanQueueConfig()
        self.model = model
        self._watcher = _Watcher(self)
        self._cleanups: set[asyncio.Task[None]] = set()

    def endpoints(self) -> dict[str | None, WorkerEndpoint]:
        """This endpoint under every name it serves: ``human`` and ``human:POOL`` for each named pool."""
        return dict.fromkeys(self.config.endpoint_names(), self)

    # ------------------------------------------------------------------ store work (in a thread)
    def _create(self, task: WorkerTask) -> tuple[Any, bool]:
        from shared.store import people
        from shared.store.models import utcnow

        deadline = utcnow() + timedelta(seconds=self.config.deadline_for(task.worker_timeout_s))
        with self.session_factory() as session:
            return people.create_task(
                session, episode_id=task.episode_id, agent=task.agent, fork_id=task.fork_id, parent=task.parent,
                pool=pool_of(task.endpoint), task=task.task, query=task.query, deadline=deadline,
                fallback=self.config.fallback,
            )

    def settle(self, task_ids: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """One look at the queue: requeue lapsed claims, consume answers past their undo window, send tasks
        past their deadline to the fallback. Returns the waiting tasks now final, and notices to publish."""
        from shared.store import people

        settled: dict[str, Any] = {}
        notices: list[dict[str, Any]] = []
        with self.session_factory() as session:
            for lapsed in people.expire_leases(session):
                notices.append(notice("lease_expired", lapsed))
            for task_id in task_ids:
                row: Any = people.consume(session, task_id=task_id)
                if row is not None:
                    notices.append(notice("consumed", row))
                else:
                    row = people.take_deadline(session, task_id=task_id)
                    if row is not None:
                        notices.append(notice("deadline", row))
                    else:
                        row = people.get_task(session, task_id)
                if row is None:
                    settled[task_id] = None
                elif row.status in people.FINAL_STATES:
                    settled[task_id] = row
        return settled, notices

    def _cancel(self, task_id: str, reason: str) -> Any:
        from shared.store import people

        with self.session_factory() as session:
            return people.cancel(session, task_id=task_id, reason=reason)

    async def _cancel_async(self, creation: asyncio.Future[tuple[Any, bool]], reason: str) -> None:
        try:
            created, _ = await creation
            row = await asyncio.to_thread(self._cancel, created.id, reason)
        except Exception:
            log.exception("cancelling a human task failed")
            return
        if row is not None:
            await publish_notice(self.bus, notice("cancelled", row))

    def _record_fallback(self, task_id: str, resolution: str, returned: str, **detail: Any) -> None:
        from shared.store import people

        with self.session_factory() as session:
            people.record_fallback(session, task_id=task_id, resolution=resolution, returned=returned, **detail)

    # ------------------------------------------------------------------ the endpoint
    async def run(self, task: WorkerTask) -> WorkerOutcome:
        creation = asyncio.ensure_future(asyncio.to_thread(self._create, task))
        fut: asyncio.Future[Any] | None = None
        try:
            row, created = await asyncio.shield(creation)
            if created:
                await publish_notice(self.bus, notice("created", row))
                log.info(
                    "episode %s: fork %s waits for a person (pool %s, task %s)", task.episode_id, task.agent, row.pool, row.id
                )
            if row.status not in ("done", "fallback", "cancelled"):
                fut = self._watcher.wait(row.id)
                final = await fut
                row = final if final is not None else row
        except asyncio.CancelledError:  # the join no longer waits: take the task out of the queue
            if fut is not None:
                self._watcher.discard(creation.result()[0].id, fut)
            cleanup = asyncio.get_running_loop().create_task(self._cancel_async(creation, "the join no longer waits"))
            self._cleanups.add(cleanup)
            cleanup.add_done_callback(self._cleanups.discard)
            raise
        if row.status == "done":
            return self._human_outcome(task, row)
        if row.status == "fallback":
            return await self._fallback(task, row)
        return failed_outcome(task, "cancelled", returned=f"[worker {task.fork_id}: the human task was cancelled]")

    @staticmethod
    def _human_outcome(task: WorkerTask, row: Any) -> WorkerOutcome:
        answer = row.returned if row.returned is not None else (row.answer or "")
        segment = worker_segment(
            task,
            prompt=task.query,
            text=f"<RETURN>{answer}</RETURN>",
            returned=answer,
            wall_start=row.created_at.timestamp() if row.created_at else time.time(),
            wall_end=time.time(),
            author="human",
        )
        return WorkerOutcome(returned=answer, timeline=[], segments=[segment])

    async def _fallback(self, task: WorkerTask, row: Any) -> WorkerOutcome:
        if row.returned is not None and row.resolution:  # a re-run episode: the fallback already answered
            return WorkerOutcome(
                returned=row.returned,
                segments=[worker_segment(task, returned=row.returned, text=f"<RETURN>{row.returned}</RETURN>")],
            )
        partial = row.draft or ""
        kind = row.fallback
        if kind == "model" and self.model is not None:
            asked = task.model_copy(update={"endpoint": None, "query": fallback_query(task.query, partial)})
            try:
                outcome = await self.model.run(asked)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("the model fallback of human task %s failed", row.id)
                outcome = failed_outcome(task, f"failed: {exc}", returned=f"[worker {task.fork_id} failed: {exc}]")
            for seg in outcome.segments:
                if seg.agent == task.agent:
                    seg.endpoint = task.endpoint  # the branch was a person's; the model answered it
            detail = {"partial_chars": len(partial), "query": asked.query[:200]}
            resolution = "model"
        elif kind == "default":
            returned = self.config.fallback_text
            outcome = WorkerOutcome(
                returned=returned,
                segments=[worker_segment(task, prompt=task.query, returned=returned, text=f"<RETURN>{returned}</RETURN>")],
            )
            detail, resolution = {}, "default"
        else:
            why = "no model worker for the fallback" if kind == "model" else "no answer from a person by the deadline"
            outcome = failed_outcome(task, "deadline", returned=f"[worker {task.fork_id} failed: {why}]")
            detail, resolution = {"why": why}, "error"
        await asyncio.to_thread(self._record_fallback, row.id, resolution, outcome.returned, **detail)
        await publish_notice(self.bus, notice("fallback", row) | {"resolution": resolution})
        log.info("episode %s: human task %s took its %s fallback", task.episode_id, row.id, resolution)
        return outcome


def human_endpoints(
    session_factory: Callable[[], Any],
    bus: Bus,
    settings: Settings,
    *,
    model: WorkerEndpoint | None = None,
) -> dict[str | None, WorkerEndpoint]:
    """The human queue's endpoints (``human`` and ``human:POOL``) for an organizer's endpoint map."""
    return HumanWorkerEndpoint(session_factory, bus, HumanQueueConfig.from_settings(settings), model=model).endpoints()


def human_endpoint_in(endpoints: Mapping[str | None, Any]) -> HumanWorkerEndpoint | None:
    """The human endpoint of an endpoint map, if it has one."""
    found = endpoints.get(HUMAN)
    return found if isinstance(found, HumanWorkerEndpoint) else None

