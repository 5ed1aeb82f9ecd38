"""Submitting an episode and following it: the logic shared by ``/v1/problems`` and ``/v1/chat/completions``.

Submission order, so that nothing is half-written:

1. the request is validated (pydantic bounds, then the task's ``problem_from_payload``, then the model
   name); any error is a :class:`~services.gateway.errors.SubmissionError` with status 422 and nothing is
   stored; a ``problem_id`` already bound to another payload is a 409 (problems are immutable);
2. the ``pending`` episode row is written and committed (a database failure is a 503 and nothing is
   published);
3. :class:`~shared.messages.SubmitProblem` is published on ``PROBLEMS_STREAM``; if that fails or takes
   longer than ``publish_timeout_s``, the stored row is marked ``failed`` with the reason and the answer
   is a 503, so no pending episode waits forever for an organizer that will never see it.

Before anything is stored, two limits an operator sets (``shared.config.Settings``): a ``capacity`` above
``max_capacity`` is a 422; and when the problems stream holds ``max_queued_episodes`` episodes no organizer
has taken, or ``max_episodes_in_flight`` are submitted and unfinished, the answer is a 429 with
``Retry-After`` (backpressure: clients wait instead of the queue growing without bound). The depth is
read at most every ``BACKLOG_CHECK_S`` (one XINFO), so the bound is approximate under a burst.

Following an episode reads its event stream with ``bus.read`` (blocking reads, so no busy polling) and,
whenever the stream is idle, checks the stored status, so an episode whose events were trimmed or never
published (a failed submission) still ends the wait.

Limits: database calls are synchronous SQLAlchemy run in a worker thread (``asyncio.to_thread``) so the
event loop (and, in embedded mode, the organizer sharing it) never waits on them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import HTTPException
from sqlalchemy.orm import Session

from services.gateway.errors import SubmissionError
from services.gateway.state import GatewayState
from shared.bus.base import Backlog
from shared.episode import EpisodeSettings
from shared.messages import (
    ORGANIZER_GROUP,
    PROBLEMS_STREAM,
    EpisodeEvent,
    EpisodeStatus,
    EventKind,
    SubmitProblem,
    events_stream,
)
from shared.plans import Plan
from shared.store import mask_url, repository
from shared.store.models import Episode, utcnow
from shared.tasks import get_task
from shared.tasks.base import Mode, Problem

log = logging.getLogger(__name__)

T = TypeVar("T")
BACKLOG_CHECK_S = 0.5  # the problems stream's depth is read at most this often



def problem_from_request(task_name: str, payload: dict[str, Any], problem_id: str | None = None) -> Problem:
    """The task's problem for ``payload``; :class:`SubmissionError` (422) with the task's message otherwise."""
    try:
        task = get_task(task_name)
    except ValueError as err:
        raise SubmissionError(422, str(err), param="task") from err
    try:
        return task.problem_from_payload(payload, problem_id)
    except ValueError as err:
        raise SubmissionError(422, f"invalid {task_name} payload: {err}", param="payload") from err


async def in_thread(session_factory: Callable[[], Session], fn: Callable[[Session], T]) -> T:
    """Run ``fn(session)`` with a fresh session in a worker thread."""

    def run() -> T:
        with session_factory() as session:
            return fn(session)

    return await asyncio.to_thread(run)


def _mark_failed(session: Session, episode_id: str, error: str) -> None:
    # The repository has no "fail a pending episode" writer yet; this is the one write the gateway
    # makes beside create_episode, and it only touches a row that is still pending.
    episode = session.get(Episode, episode_id)
    if episode is not None and episode.status == EpisodeStatus.PENDING:
        episode.status = EpisodeStatus.FAILED
        episode.error = error
        episode.finished_at = utcnow()
        session.commit()


def served_models(state: GatewayState) -> list[str]:
    """The names a submission's ``model`` may take: the served weights and the OpenAI-compatible names."""
    return [state.model_id, *(name for name in state.chat_models if name != state.model_id)]


def check_model(state: GatewayState, model: str | None) -> None:
    """SubmissionError (422) unless ``model`` is None or names a served model."""
    if model is not None and model not in served_models(state):
        raise SubmissionError(
            422,
            f"the model {model[:64]!r} is not served here; served models: {', '.join(served_models(state))}",
            param="model",
        )


async def backlog(state: GatewayState, *, fresh: bool = False) -> Backlog | None:
    """The problems stream's depth (cached for ``BACKLOG_CHECK_S``), also set on the scaling gauges;
    None where the bus cannot tell."""
    now = time.monotonic()
    if not fresh and state.backlog_checked is not None and now - state.backlog_checked[0] < BACKLOG_CHECK_S:
        return state.backlog_checked[1]  # type: ignore[no-any-return]
    probe = getattr(state.bus, "backlog", None)
    if probe is None:
        return None
    depth: Backlog = await probe(PROBLEMS_STREAM, ORGANIZER_GROUP)
    state.backlog_checked = (now, depth)
    state.metrics.problems_queued.set(depth.lag)
    state.metrics.episodes_in_flight.set(depth.total)
    return depth


def check_limits(state: GatewayState, settings: EpisodeSettings, capacity: int) -> None:
    """422 for a capacity above the operator's ``max_capacity`` (parallel mode is bounded by its own k)."""
    limit = state.settings.max_capacity
    if settings.mode is not Mode.PARALLEL and capacity > limit:
        raise SubmissionError(
            422, f"capacity {capacity} is above this gateway's limit of {limit} (ASYNCTHINK_MAX_CAPACITY)",
            param="capacity",
        )  # fmt: skip


async def check_backpressure(state: GatewayState) -> None:
    """429 with ``Retry-After`` when the queue is too deep or too many episodes are in flight."""
    settings = state.settings
    if not (settings.max_queued_episodes or settings.max_episodes_in_flight):
        return
    try:
        depth = await backlog(state)
    except Exception as exc:  # the bus is down: the publish fails later with its own 503
        log.warning("reading the queue depth failed: %s", exc)
        return
    if depth is None:
        return
    reason = ""
    if settings.max_queued_episodes and depth.lag >= settings.max_queued_episodes:
        reason, what = "queued", f"{depth.lag} episodes are waiting for an organizer (limit {settings.max_queued_episodes})"
    elif settings.max_episodes_in_flight and depth.total >= settings.max_episodes_in_flight:
        reason = "in_flight"
        what = f"{depth.total} episodes are in flight (limit {settings.max_episodes_in_flight})"
    if reason:
        state.metrics.backpressure.labels(reason).inc()
        raise HTTPException(
            429, detail=f"busy: {what}; retry in {settings.retry_after_s} s",
            headers={"Retry-After": str(settings.retry_after_s)},
        )  # fmt: skip


def content_addressed(problem: Problem) -> Problem:
    """``problem`` under an id that also hashes its payload (for a derived id already bound elsewhere)."""
    digest = hashlib.sha256(json.dumps(problem.payload, sort_keys=True, default=str).encode()).hexdigest()
    return dataclasses.replace(problem, id=f"{problem.id[:200]}-{digest[:12]}")


async def submit_episode(
    state: GatewayState,
    *,
    problem: Problem,
    settings: EpisodeSettings,
    model: str | None,
    api: str,
    explicit_id: bool = False,
    api_key_id: str | None = None,
    episode_id: str | None = None,
    organizer: str = "model",
    plan: Plan | None = None,
) -> str:
    """Store a pending episode, then queue it for an organizer; returns the episode id (see module doc).

    ``model``, when given, must name a served model (422 otherwise); the stored ``model_id`` is always the
    served weights. Problems are immutable: a client's ``problem_id`` (``explicit_id``) already bound to
    another payload is a 409; an id the task derived moves to a content-addressed one instead.
    ``api_key_id`` (the submitting key) owns the episode. The pages for people also give the episode's id,
    a human ``organizer`` and an approved ``plan`` (:class:`~shared.messages.SubmitProblem`).
    """
    check_model(state, model)
    task = get_task(problem.task)
    capacity = settings.resolved_capacity(task.default_capacity)
    check_limits(state, settings, capacity)
    await check_backpressure(state)
    episode_id = episode_id or uuid.uuid4().hex
    config = SubmitProblem(
        episode_id=episode_id, task=problem.task, problem_id=problem.id, payload=problem.payload,
        settings=settings, model=model, organizer=organizer, plan=plan,
    ).stored_config()  # fmt: skip

    def create(session: Session, problem: Problem) -> None:
        repository.create_episode(
            session,
            episode_id=episode_id,
            problem=problem,
            mode=settings.mode,
            capacity=capacity,
            model_id=state.model_id,
            config=config,
            api_key_id=api_key_id,
        )

    try:
        try:
            await in_thread(state.session_factory, lambda s: create(s, problem))
        except repository.ProblemConflict as conflict:
            if explicit_id:
                raise SubmissionError(409, str(conflict), param="problem_id") from conflict
            problem = content_addressed(problem)
            await in_thread(state.session_factory, lambda s: create(s, problem))
    except SubmissionError:
        raise
    except repository.ProblemConflict as err:
        raise SubmissionError(409, str(err), param="problem_id") from err
    except Exception as err:
        state.metrics.submit_failures.labels("database").inc()
        log.exception("storing episode %s in %s failed", episode_id, mask_url(state.settings.database_url))
        # The exception may carry the URL, the SQL and its parameters: the log gets it, the client not.
        raise SubmissionError(
            503, f"the database did not accept the episode ({type(err).__name__}); nothing was queued"
        ) from err

    message = SubmitProblem(
        episode_id=episode_id,
        task=problem.task,
        problem_id=problem.id,
        payload=problem.payload,
        settings=settings,
        model=model,
        organizer=organizer,
        plan=plan,
    )
    try:
        await asyncio.wait_for(
            state.bus.publish(PROBLEMS_STREAM, {"data": message.model_dump_json()}), state.publish_timeout_s
        )
    except Exception as err:
        state.metrics.submit_failures.labels("bus").inc()
        reason = "timed out" if isinstance(err, TimeoutError) else type(err).__name__
        error = f"could not queue the episode on the bus ({reason})"
        log.error("episode %s: %s", episode_id, error, exc_info=err)
        try:
            await in_thread(state.session_factory, lambda s: _mark_failed(s, episode_id, error))
        except Exception:
            log.exception("marking episode %s failed also failed", episode_id)
        raise SubmissionError(
            503, f"{error}; episode {episode_id} is marked failed, submit again", episode_id=episode_id
        ) from err
    state.metrics.episodes_submitted.labels(problem.task, settings.mode.value, api).inc()
    return episode_id


# ----------------------------------------------------------------------------- following an episode
@dataclass(frozen=True)
class StreamItem:
    entry_id: str | None  # the stream entry id; None for an event synthesised from the store
    event: EpisodeEvent | None  # None: the stream was idle for one heartbeat period


def finished_event_from_row(episode: Episode) -> EpisodeEvent:
    """A ``finished`` event built from a stored episode (its events are gone or were never published)."""
    return EpisodeEvent(
        episode_id=episode.id,
        seq=0,
        kind=EventKind.FINISHED,
        clock=episode.latency or 0,
        data={
            "status": episode.status,
            "answer": episode.answer,
            "accuracy": episode.accuracy,
            "reward": episode.reward_total,
            "latency": episode.latency,
            "eta": episode.eta,
            "error": episode.error,
            "from_store": True,
        },
    )


async def stored_status(state: GatewayState, episode_id: str) -> Episode | None:
    return await in_thread(state.session_factory, lambda s: repository.get_episode(s, episode_id))


async def follow_events(
    state: GatewayState, episode_id: str, *, after: str = "0", heartbeat_s: float | None = None
) -> AsyncGenerator[StreamItem, None]:
    """Yield the episode's events after ``after`` until ``finished``; an idle period yields a heartbeat.

    If the stream is idle and the stored episode is already final, a ``finished`` event built from the
    store ends the stream (events trimmed or never published). After a ``failed`` event the stream
    ends at the first idle period if no ``finished`` follows.
    """
    stream = events_stream(episode_id)
    heartbeat_ms = max(1, int(1000 * (heartbeat_s if heartbeat_s is not None else state.sse_heartbeat_s)))
    failed = False
    first = True  # the first look does not wait: a finished episode whose events are gone ends at once
    while True:
        block_ms = 0 if first else 1000 if failed else heartbeat_ms
        first = False
        entries = await state.bus.read(stream, after=after, count=100, block_ms=block_ms)
        if not entries:
            if failed:
                return
            row = await stored_status(state, episode_id)
            if row is not None and EpisodeStatus(row.status).finished:
                # One more non-blocking read: the finished event may have landed after the status.
                entries = await state.bus.read(stream, after=after, count=100, block_ms=0)
                if not entries:
                    yield StreamItem(None, finished_event_from_row(row))
                    return
            else:
                yield StreamItem(None, None)
                continue
        for entry in entries:
            after = entry.id
            try:
                event = EpisodeEvent.model_validate_json(entry.fields.get("data", ""))
            except ValueError:
                log.warning("skipping malformed event %s on %s", entry.id, stream)
                continue
            yield StreamItem(entry.id, event)
            if event.kind is EventKind.FINISHED:  # the engine always ends an episode's events with it
                return
            if event.kind is EventKind.FAILED:  # before "finished"; an organizer may send it alone
                failed = True


async def wait_finished(state: GatewayState, episode_id: str, *, settle_s: float = 5.0) -> Episode | None:
    """After the ``finished`` event, the stored row once the organizer has written its final status.

    The organizer may publish ``finished`` a moment before its final write commits; this polls the
    row (with backoff) for up to ``settle_s`` and returns whatever is stored then.
    """
    delay = 0.01
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settle_s
    while True:
        row = await stored_status(state, episode_id)
        if row is None or EpisodeStatus(row.status).finished or loop.time() >= deadline:
            return row
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.25)
