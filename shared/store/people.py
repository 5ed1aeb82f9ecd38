"""The human queue and fork/join plans in the store: every transition one conditional UPDATE, audited.

A human task moves ``open → claimed → submitted → done``, or to ``fallback`` when its deadline passes first,
or to ``cancelled`` when its episode ends without joining it (see :class:`~shared.store.models.HumanTask`).
Each transition here is a single ``UPDATE … WHERE <the state it leaves>`` whose row count says whether it
happened, so two people claiming one task, a double submit, a submit after the lease lapsed or after the
deadline, and two organizers consuming one answer each resolve to exactly one winner, on SQLite and on
PostgreSQL alike (the row lock makes the loser re-check the ``WHERE`` against the winner's write). The
loser gets :class:`QueueConflict` with a reason a page can show. Every claim, release, lease expiry,
submit, undo, consumption, deadline, fallback and cancellation writes a ``human_audit`` row in the same
transaction.

Two clocks are kept apart: the **lease** (``lease_until``, renewed while a person's page is open; a lapsed
lease counts as open, so a claim never waits for a sweep) and the **deadline** (fixed when the task is
created). Times are the writer's clock (UTC): the gateway and the organizer should share a time source.

Like :mod:`shared.store.repository`: an explicit ``session``, keyword-only arguments, commits by default.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from shared.store.models import HumanAudit, HumanTask, PlanRow, utcnow
from shared.store.repository import _insert, _json, _writing

OPEN_STATES = ("open", "claimed")  # waiting for a person
FINAL_STATES = ("done", "fallback", "cancelled")


@dataclass(frozen=True)
class Actor:
    """Who acts on a task: a person (their key id and name), or the system (``key_id`` None)."""

    key_id: str | None
    name: str


SYSTEM = Actor(None, "system")


class QueueConflict(Exception):
    """A transition that did not happen; ``reason`` names why (``taken``, ``lease_lost``, ``deadline_passed``,
    ``already_submitted``, ``not_claimed``, ``undo_window_over``, ``finished``, ``missing``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _audit(session: Session, task: HumanTask, action: str, actor: Actor, **detail: Any) -> None:
    session.add(
        HumanAudit(
            task_id=task.id, episode_id=task.episode_id, action=action, actor=actor.key_id,
            actor_name=actor.name, detail=_json(detail), at=utcnow(),
        )
    )


def _fresh(session: Session, task_id: str) -> HumanTask | None:
    return session.get(HumanTask, task_id, populate_existing=True)


def _changed(session: Session, task_id: str, where: Any, values: dict[str, Any]) -> HumanTask | None:
    """Run one conditional UPDATE of a task; the updated row, or None when ``where`` did not hold."""
    result = session.execute(update(HumanTask).where(HumanTask.id == task_id, where).values(**values))
    if not getattr(result, "rowcount", 0):
        return None
    return _fresh(session, task_id)


# ----------------------------------------------------------------------------- creating and reading
def create_task(
    session: Session,
    *,
    episode_id: str,
    agent: str,
    fork_id: int,
    parent: str,
    pool: str,
    task: str,
    query: str,
    deadline: datetime,
    fallback: str,
    commit: bool = True,
) -> tuple[HumanTask, bool]:
    """The task of ``(episode_id, agent)``: created ``open`` (and audited) or, for a re-run episode, the one
    stored before; the flag says whether it was created now."""
    task_id = uuid.uuid4().hex
    with _writing(session, commit):
        stmt = _insert(session, HumanTask).values(
            id=task_id, episode_id=episode_id, agent=agent, fork_id=fork_id, parent=parent, pool=pool,
            task=task, query=query, status="open", deadline=deadline, fallback=fallback, created_at=utcnow(),
        )
        session.execute(stmt.on_conflict_do_nothing(index_elements=["episode_id", "agent"]))
        row = session.scalars(
            select(HumanTask)
            .where(HumanTask.episode_id == episode_id, HumanTask.agent == agent)
            .execution_options(populate_existing=True)
        ).one()
        created = row.id == task_id
        if created:
            _audit(session, row, "created", SYSTEM, pool=pool, deadline=deadline.isoformat(), fallback=fallback)
    return row, created


def get_task(session: Session, task_id: str) -> HumanTask | None:
    return _fresh(session, task_id)


def list_tasks(
    session: Session,
    *,
    pools: Sequence[str] | None = None,
    statuses: Sequence[str] | None = None,
    episode_ids: Iterable[str] | None = None,
    limit: int = 200,
) -> list[HumanTask]:
    """Tasks, oldest first; ``pools`` None means every pool."""
    stmt = select(HumanTask)
    if pools is not None:
        stmt = stmt.where(HumanTask.pool.in_(list(pools)))
    if statuses is not None:
        stmt = stmt.where(HumanTask.status.in_(list(statuses)))
    if episode_ids is not None:
        stmt = stmt.where(HumanTask.episode_id.in_(list(episode_ids)))
    return list(session.scalars(stmt.order_by(HumanTask.created_at, HumanTask.id).limit(limit)).all())


def audit(session: Session, *, task_id: str | None = None, episode_id: str | None = None) -> list[HumanAudit]:
    stmt = select(HumanAudit)
    if task_id is not None:
        stmt = stmt.where(HumanAudit.task_id == task_id)
    if episode_id is not None:
        stmt = stmt.where(HumanAudit.episode_id == episode_id)
    return list(session.scalars(stmt.order_by(HumanAudit.id)).all())


def has_task_in(session: Session, *, episode_id: str, pools: Sequence[str] | None) -> bool:
    """Whether the episode has a human task in one of ``pools`` (None: any): what a person was given."""
    stmt = select(HumanTask.id).where(HumanTask.episode_id == episode_id)
    if pools is not None:
        stmt = stmt.where(HumanTask.pool.in_(list(pools)))
    return session.scalars(stmt.limit(1)).first() is not None


def _why(row: HumanTask | None, actor: Actor, now: datetime) -> QueueConflict:
    """Why a transition on ``row`` by ``actor`` did not happen."""
    if row is None:
        return QueueConflict("missing", "no such task")
    if row.status in FINAL_STATES:
        return QueueConflict("finished", f"the task is {row.status}: its join has what it needs")
    if row.deadline <= now and row.status in OPEN_STATES:
        return QueueConflict("deadline_passed", "the task's deadline has passed; it went to its fallback")
    if row.status == "submitted":
        if row.answered_by == actor.key_id:
            return QueueConflict("already_submitted", "you already submitted an answer to this task")
        return QueueConflict("taken", f"{row.answered_by_name or 'someone'} already answered this task")
    if row.status == "claimed" and row.claimed_by != actor.key_id and row.lease_until and row.lease_until >= now:
        return QueueConflict("taken", f"{row.claimed_by_name or 'someone'} is working on this task")
    if row.status == "claimed" and row.claimed_by == actor.key_id:
        return QueueConflict("lease_lost", "your claim on this task lapsed; claim it again")
    return QueueConflict("not_claimed", "claim the task first")


# ----------------------------------------------------------------------------- a person's transitions
def _lapse_lease(session: Session, task_id: str, now: datetime) -> None:
    """Record the lapse of a claim nobody renewed (before someone else takes the task)."""
    row = _fresh(session, task_id)
    if row is None or row.status != "claimed" or row.lease_until is None or row.lease_until >= now:
        return
    holder = Actor(row.claimed_by, row.claimed_by_name or "")
    lease_until = row.lease_until.isoformat()
    lapsed = _changed(
        session, task_id,
        and_(HumanTask.status == "claimed", HumanTask.lease_until < now),
        {"status": "open", "claimed_by": None, "claimed_by_name": None, "lease_until": None},
    )
    if lapsed is not None:
        _audit(session, lapsed, "lease_expired", holder, lease_until=lease_until)


def claim(
    session: Session, *, task_id: str, actor: Actor, lease_s: float, now: datetime | None = None, commit: bool = True
) -> HumanTask:
    """Take the task for ``lease_s`` seconds: an open task, one whose claim lapsed, or one you hold
    (renewed). QueueConflict when someone else holds it, it is answered, or its deadline passed."""
    now = now or utcnow()
    with _writing(session, commit):
        _lapse_lease(session, task_id, now)
        row = _changed(
            session, task_id,
            and_(
                HumanTask.deadline > now,
                or_(HumanTask.status == "open", and_(HumanTask.status == "claimed", HumanTask.claimed_by == actor.key_id)),
            ),
            {
                "status": "claimed", "claimed_by": actor.key_id, "claimed_by_name": actor.name,
                "lease_until": now + timedelta(seconds=lease_s),
            },
        )
        if row is None:
            raise _why(_fresh(session, task_id), actor, now)
        _audit(session, row, "claim", actor, lease_until=row.lease_until.isoformat() if row.lease_until else None)
    return row


def renew(
    session: Session, *, task_id: str, actor: Actor, lease_s: float, draft: str | None = None,
    now: datetime | None = None, commit: bool = True,
) -> HumanTask:
    """Extend your live claim (the page is still open) and keep the partial answer typed so far. A lapsed
    claim is not renewed: QueueConflict ``lease_lost`` (claim again; someone else may hold it by now)."""
    now = now or utcnow()
    values: dict[str, Any] = {"lease_until": now + timedelta(seconds=lease_s)}
    if draft is not None:
        values["draft"] = draft
    with _writing(session, commit):
        row = _changed(
            session, task_id,
            and_(
                HumanTask.status == "claimed", HumanTask.claimed_by == actor.key_id,
                HumanTask.lease_until >= now, HumanTask.deadline > now,
            ),
            values,
        )
        if row is None:
            raise _why(_fresh(session, task_id), actor, now)
    return row


def release(
    session: Session, *, task_id: str, actor: Actor, reason: str = "released", draft: str | None = None,
    now: datetime | None = None, commit: bool = True,
) -> HumanTask:
    """Give a task you hold back to the queue (skip, or the page closed), keeping your partial answer."""
    now = now or utcnow()
    values: dict[str, Any] = {"status": "open", "claimed_by": None, "claimed_by_name": None, "lease_until": None}
    if draft is not None:
        values["draft"] = draft
    with _writing(session, commit):
        row = _changed(
            session, task_id, and_(HumanTask.status == "claimed", HumanTask.claimed_by == actor.key_id), values
        )
        if row is None:
            raise _why(_fresh(session, task_id), actor, now)
        _audit(session, row, "release", actor, reason=reason[:64])
    return row


def submit(
    session: Session, *, task_id: str, actor: Actor, answer: str, undo_s: float, now: datetime | None = None,
    commit: bool = True,
) -> HumanTask:
    """Answer a task you hold, within your lease and before the deadline. The join consumes the answer
    only after ``undo_s`` seconds (:func:`undo` takes it back until then). A second submit, a submit after
    the lease lapsed or after the deadline: QueueConflict, nothing written."""
    now = now or utcnow()
    with _writing(session, commit):
        row = _changed(
            session, task_id,
            and_(
                HumanTask.status == "claimed", HumanTask.claimed_by == actor.key_id,
                HumanTask.lease_until >= now, HumanTask.deadline > now,
            ),
            {
                "status": "submitted", "answer": answer, "draft": answer, "answered_by": actor.key_id,
                "answered_by_name": actor.name, "submitted_at": now,
                "undo_until": now + timedelta(seconds=undo_s),
            },
        )
        if row is None:
            raise _why(_fresh(session, task_id), actor, now)
        _audit(session, row, "submit", actor, chars=len(answer), undo_until=row.undo_until.isoformat() if row.undo_until else None)
    return row


def undo(
    session: Session, *, task_id: str, actor: Actor, lease_s: float, now: datetime | None = None, commit: bool = True
) -> HumanTask:
    """Take your answer back within the undo window (before the join consumes it, before the deadline):
    the task is yours again, claimed, with the answer as your draft."""
    now = now or utcnow()
    with _writing(session, commit):
        row = _changed(
            session, task_id,
            and_(
                HumanTask.status == "submitted", HumanTask.answered_by == actor.key_id,
                HumanTask.undo_until > now, HumanTask.deadline > now,
            ),
            {
                "status": "claimed", "claimed_by": actor.key_id, "claimed_by_name": actor.name,
                "lease_until": now + timedelta(seconds=lease_s), "answer": None, "answered_by": None,
                "answered_by_name": None, "submitted_at": None, "undo_until": None,
            },
        )
        if row is None:
            current = _fresh(session, task_id)
            if current is not None and current.status == "submitted":
                raise QueueConflict("undo_window_over", "too late to take it back: the join has it")
            raise _why(current, actor, now)
        _audit(session, row, "undo", actor)
    return row


# ----------------------------------------------------------------------------- the system's transitions
def expire_leases(session: Session, *, now: datetime | None = None, commit: bool = True) -> list[HumanTask]:
    """Requeue every claim whose lease lapsed (nobody renewed it: the page was closed); the requeued tasks."""
    now = now or utcnow()
    out: list[HumanTask] = []
    with _writing(session, commit):
        ids = session.scalars(
            select(HumanTask.id).where(HumanTask.status == "claimed", HumanTask.lease_until < now)
        ).all()
        for task_id in ids:
            _lapse_lease(session, task_id, now)
            row = _fresh(session, task_id)
            if row is not None and row.status == "open":
                out.append(row)
    return out


def consume(session: Session, *, task_id: str, now: datetime | None = None, commit: bool = True) -> HumanTask | None:
    """The join takes a submitted answer once its undo window is over: the task is ``done`` and the answer
    is what the join received. None when there is nothing to take (yet); exactly one caller gets the row."""
    now = now or utcnow()
    with _writing(session, commit):
        current = _fresh(session, task_id)
        if current is None or current.status != "submitted":
            return None
        row = _changed(
            session, task_id,
            and_(HumanTask.status == "submitted", HumanTask.undo_until <= now),
            {"status": "done", "returned": current.answer, "resolution": "human", "finished_at": now},
        )
        if row is not None:
            _audit(session, row, "consumed", SYSTEM, by=row.answered_by)
    return row


def take_deadline(session: Session, *, task_id: str, now: datetime | None = None, commit: bool = True) -> HumanTask | None:
    """The deadline passed with no answer: the task leaves the queue for its fallback (the holder's claim
    ends; the partial answer stays in ``draft``). None unless this call made that happen."""
    now = now or utcnow()
    with _writing(session, commit):
        before = _fresh(session, task_id)
        holder = before.claimed_by if before is not None else None
        row = _changed(
            session, task_id,
            and_(HumanTask.status.in_(OPEN_STATES), HumanTask.deadline <= now),
            {"status": "fallback", "claimed_by": None, "claimed_by_name": None, "lease_until": None, "finished_at": now},
        )
        if row is not None:
            _audit(
                session, row, "deadline", SYSTEM, fallback=row.fallback, partial_chars=len(row.draft or ""),
                holder=holder,
            )
    return row


def record_fallback(
    session: Session, *, task_id: str, resolution: str, returned: str, commit: bool = True, **detail: Any
) -> HumanTask | None:
    """What the fallback gave the join (``model``, ``default`` or ``error``)."""
    with _writing(session, commit):
        row = _changed(
            session, task_id, HumanTask.status == "fallback", {"resolution": resolution, "returned": returned}
        )
        if row is not None:
            _audit(session, row, "fallback", SYSTEM, resolution=resolution, **detail)
    return row


def cancel(session: Session, *, task_id: str, reason: str, commit: bool = True) -> HumanTask | None:
    """The episode no longer waits for this task (it answered without joining, or timed out)."""
    with _writing(session, commit):
        row = _changed(
            session, task_id, HumanTask.status.in_(("open", "claimed", "submitted")),
            {"status": "cancelled", "resolution": "cancelled", "lease_until": None, "finished_at": utcnow()},
        )
        if row is not None:
            _audit(session, row, "cancelled", SYSTEM, reason=reason[:200])
    return row


# ----------------------------------------------------------------------------- plans
def create_plan(
    session: Session,
    *,
    actor: Actor,
    task: str,
    problem_id: str,
    payload: dict[str, Any],
    settings: dict[str, Any],
    proposed: dict[str, Any],
    proposal_text: str,
    commit: bool = True,
) -> PlanRow:
    row = PlanRow(
        id=uuid.uuid4().hex, created_by=actor.key_id, created_by_name=actor.name, task=task, problem_id=problem_id,
        payload=_json(payload), settings=_json(settings), proposed=_json(proposed), proposal_text=proposal_text,
        status="draft", created_at=utcnow(),
    )
    with _writing(session, commit):
        session.add(row)
    return row


def get_plan(session: Session, plan_id: str) -> PlanRow | None:
    return session.get(PlanRow, plan_id, populate_existing=True)


def approve_plan(
    session: Session, *, plan_id: str, approved: dict[str, Any], episode_id: str, commit: bool = True
) -> PlanRow | None:
    """Record the approved plan and the episode that runs it; None if it was approved before (one plan,
    one episode: a second approval, e.g. a double click, starts nothing)."""
    with _writing(session, commit):
        result = session.execute(
            update(PlanRow)
            .where(PlanRow.id == plan_id, PlanRow.status == "draft")
            .values(approved=_json(approved), episode_id=episode_id, status="approved", approved_at=utcnow())
        )
    return get_plan(session, plan_id) if getattr(result, "rowcount", 0) else None


def plans_of_episode(session: Session, episode_id: str) -> list[PlanRow]:
    return list(session.scalars(select(PlanRow).where(PlanRow.episode_id == episode_id)).all())
