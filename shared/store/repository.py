"""Reading and writing traces (problems, episodes, segments, model versions) and the gateway's API keys.

Every function takes an explicit ``session`` and keyword-only arguments (``crud.py`` style). Writes
are idempotent upserts (``INSERT … ON CONFLICT``) so a message delivered twice (Redis streams and
Celery are at-least-once) updates the stored row instead of adding a duplicate or failing:

* a problem is keyed by ``(task, problem_id)``, an episode by its id, a segment by
  ``(episode_id, agent)``, a model version by ``(model_id, version)``;
* problems are **immutable**: an id is bound to the payload first stored under it; storing the same
  payload again reuses the row, another payload raises :class:`ProblemConflict` (nothing is written);
* :func:`save_episode` writes the problem, the episode and all its segments in one transaction, and
  removes the segments of agents the result does not have, so an episode run twice (a redelivery)
  keeps exactly one set of segments: the stored run's. Segments already stored whole while the episode
  ran (``live_agents``) are not written again: only their clock spans, known at the end, are updated;
* :func:`save_segments` upserts many segments (of one or several episodes) in one statement, and
  :func:`append_segment` appends to a stored segment's ids (PostgreSQL), so a writer that batches or
  extends never rewrites what is stored;
* :func:`mark_failed` ends an unfinished episode (a dead-lettered submission) without touching a
  finished one.

Writers commit by default; pass ``commit=False`` to only flush and make the write part of a larger
transaction that the caller commits. On an error inside a committing writer the session is rolled back.

Limits: upserts are implemented for SQLite and PostgreSQL only (the two supported backends); the
last write of a row wins, there is no version check between concurrent writers of the same episode.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic_core import to_jsonable_python
from sqlalchemy import Table, bindparam, delete, func, literal, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from shared.auth import Scope, generate_key, hash_key, parse_scopes
from shared.messages import EpisodeStatus, SegmentRecord
from shared.store.models import (
    MODEL_VERSION_KINDS,
    ApiKey,
    Episode,
    ModelVersion,
    ProblemRow,
    Segment,
    UTCDateTime,
    utcnow,
)
from shared.tasks.base import Mode, Problem

if TYPE_CHECKING:
    from shared.engine import EpisodeResult


class ProblemConflict(ValueError):
    """A problem id already stored with another payload (problems are immutable)."""

    def __init__(self, task: str, problem_id: str) -> None:
        super().__init__(
            f"problem_id {problem_id[:80]!r} of task {task} is already stored with a different payload; "
            "problems are immutable: use a new problem_id for this payload, or none to let the task derive one"
        )
        self.task = task
        self.problem_id = problem_id


class EpisodeNotFound(LookupError):
    """No episode with that id is stored."""

    def __init__(self, episode_id: str) -> None:
        super().__init__(f"no episode {episode_id!r} in the store (create it first with create_episode)")
        self.episode_id = episode_id


# ----------------------------------------------------------------------------- helpers
def _table(model: type[Any]) -> Table:
    table = model.__table__
    assert isinstance(table, Table)
    return table


def _insert(session: Session, model: type[Any]) -> Any:
    """A dialect insert (with ``on_conflict_do_update``/``_nothing``) into ``model``'s table."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(_table(model))
    if dialect == "sqlite":
        return sqlite.insert(_table(model))
    raise NotImplementedError(f"the store supports sqlite and postgresql, not {dialect!r}")


@contextmanager
def _writing(session: Session, commit: bool) -> Iterator[None]:
    """Commit (or flush) after the block; roll back a committing writer's session on error."""
    try:
        yield
        if commit:
            session.commit()
        else:
            session.flush()
    except BaseException:
        if commit:
            session.rollback()
        raise


def _no_nul(value: Any) -> Any:
    """``value`` with every NUL character replaced by U+FFFD: PostgreSQL refuses NUL in text and JSON,
    and a model may decode one (the token ids, kept beside the text, stay exact)."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if isinstance(value, list):
        return [_no_nul(v) for v in value]
    if isinstance(value, dict):
        return {k: _no_nul(v) for k, v in value.items()}
    return value


def _json(value: Any) -> Any:
    return _no_nul(to_jsonable_python(value, fallback=str))


def _ts(unix: float) -> datetime | None:
    return datetime.fromtimestamp(unix, UTC) if unix > 0 else None


_SEGMENT_COLUMNS: list[str] = []


def _segment_values(episode_id: str, seg: SegmentRecord) -> dict[str, Any]:
    if not _SEGMENT_COLUMNS:
        columns = _table(Segment).c
        _SEGMENT_COLUMNS.extend(k for k in SegmentRecord.model_fields if k in columns)
    values = {k: _no_nul(v) if isinstance(v := getattr(seg, k), str) else v for k in _SEGMENT_COLUMNS}
    values["prompt_ids"] = _ints(seg.prompt_ids)
    values["completion_ids"] = _ints(seg.completion_ids)
    values["completion_mask"] = _ints(seg.completion_mask)
    values["episode_id"] = episode_id
    return values


def _ints(values: Sequence[Any]) -> list[int]:
    """Token ids as plain ints for JSON: a validated list of ints as it is (no copy), anything else converted."""
    if type(values) is list and (not values or (type(values[0]) is int and type(values[-1]) is int)):
        return values
    return [int(v) for v in values]


def _upsert_segments(session: Session, episode_id: str, segments: Sequence[SegmentRecord]) -> None:
    if not segments:
        return
    rows = [_segment_values(episode_id, s) for s in segments]
    stmt = _insert(session, Segment)
    stmt = stmt.on_conflict_do_update(
        index_elements=["episode_id", "agent"],
        set_={k: stmt.excluded[k] for k in rows[0] if k not in ("episode_id", "agent")},
    )
    session.execute(stmt, rows)


def _problem_pk(session: Session, problem: Problem) -> int:
    """The row of ``problem``: inserted if new, reused if stored with the same payload; ProblemConflict
    if its id is stored with another payload (the stored row is never changed)."""
    payload = _json(problem.payload)
    stmt = _insert(session, ProblemRow).values(
        task=problem.task,
        problem_id=problem.id,
        payload=payload,
        reference=_json(problem.reference),
        created_at=utcnow(),
    )
    session.execute(stmt.on_conflict_do_nothing(index_elements=["task", "problem_id"]))
    t = _table(ProblemRow)
    pk, stored = session.execute(
        select(t.c.id, t.c.payload).where(t.c.task == problem.task, t.c.problem_id == problem.id)
    ).one()
    if stored != payload:
        raise ProblemConflict(problem.task, problem.id)
    return int(pk)


def _fresh_episode(session: Session, episode_id: str) -> Episode:
    """The stored episode, reloaded (core upserts bypass the session's identity map)."""
    episode = session.get(Episode, episode_id, populate_existing=True)
    if episode is None:
        raise EpisodeNotFound(episode_id)
    session.expire(episode, ["segments"])
    return episode


# ----------------------------------------------------------------------------- problems
def upsert_problem(session: Session, *, problem: Problem, commit: bool = True) -> ProblemRow:
    """Store ``problem`` (or find it stored with the same payload) and return its row; ProblemConflict
    if its id is stored with another payload."""
    with _writing(session, commit):
        pk = _problem_pk(session, problem)
    row = session.get(ProblemRow, pk, populate_existing=True)
    assert row is not None
    return row


def get_problem(session: Session, *, task: str, problem_id: str) -> ProblemRow | None:
    return session.scalars(
        select(ProblemRow).where(ProblemRow.task == task, ProblemRow.problem_id == problem_id)
    ).one_or_none()


# ----------------------------------------------------------------------------- episodes
def create_episode(
    session: Session,
    *,
    episode_id: str,
    problem: Problem,
    mode: Mode | str,
    capacity: int,
    model_id: str,
    config: dict[str, Any] | None = None,
    model_version: str | None = None,
    api_key_id: str | None = None,
    commit: bool = True,
) -> Episode:
    """Store a ``pending`` episode (e.g. submitted over REST, run later with ``config``); ``api_key_id``
    is the key that submitted it (only that key, and admins, see it over the API).

    Idempotent: if the episode already exists it is returned unchanged.
    """
    with _writing(session, commit):
        pk = _problem_pk(session, problem)
        stmt = _insert(session, Episode).values(
            id=episode_id,
            problem_pk=pk,
            task=problem.task,
            mode=str(Mode(mode)),
            capacity=capacity,
            model_id=model_id,
            model_version=model_version,
            status=EpisodeStatus.PENDING.value,
            config=_json(config or {}),
            api_key_id=api_key_id,
            created_at=utcnow(),
        )
        session.execute(stmt.on_conflict_do_nothing(index_elements=["id"]))
    return _fresh_episode(session, episode_id)


def mark_running(
    session: Session, *, episode_id: str, model_version: str | None = None, commit: bool = True
) -> Episode:
    """Move a pending episode to ``running`` and stamp ``started_at`` (once).

    A finished episode is left as it is (a late, re-delivered "started" event must not undo a result).
    """
    t = _table(Episode)
    with _writing(session, commit):
        values: dict[str, Any] = {
            "status": EpisodeStatus.RUNNING.value,
            "started_at": func.coalesce(t.c.started_at, literal(utcnow(), UTCDateTime())),
        }
        if model_version is not None:
            values["model_version"] = model_version
        session.execute(
            update(t).where(t.c.id == episode_id, t.c.status.in_((EpisodeStatus.PENDING.value, EpisodeStatus.RUNNING.value))).values(**values)
        )
    return _fresh_episode(session, episode_id)


def start_episode(
    session: Session,
    *,
    episode_id: str,
    problem: Problem,
    mode: Mode | str,
    capacity: int,
    model_id: str,
    config: dict[str, Any] | None = None,
    model_version: str | None = None,
    commit: bool = True,
) -> EpisodeStatus | None:
    """An organizer takes an episode: mark it ``running`` (creating it first if it was never stored) in
    one transaction of plain statements, and return the status it had before (None: created here). A
    finished episode is left as it is (its status is returned: the caller skips it)."""
    t = _table(Episode)
    with _writing(session, commit):
        before = session.execute(select(t.c.status).where(t.c.id == episode_id)).scalar_one_or_none()
        if before is not None and EpisodeStatus(before).finished:
            return EpisodeStatus(before)
        now = utcnow()
        if before is None:
            pk = _problem_pk(session, problem)
            stmt = _insert(session, Episode).values(
                id=episode_id, problem_pk=pk, task=problem.task, mode=str(Mode(mode)), capacity=capacity,
                model_id=model_id, model_version=model_version, status=EpisodeStatus.RUNNING.value,
                config=_json(config or {}), created_at=now, started_at=now,
            )  # fmt: skip
            session.execute(stmt.on_conflict_do_nothing(index_elements=["id"]))
        else:
            values: dict[str, Any] = {
                "status": EpisodeStatus.RUNNING.value,
                "started_at": func.coalesce(t.c.started_at, literal(now, UTCDateTime())),
            }
            if model_version is not None:
                values["model_version"] = model_version
            unfinished = (EpisodeStatus.PENDING.value, EpisodeStatus.RUNNING.value)
            session.execute(update(t).where(t.c.id == episode_id, t.c.status.in_(unfinished)).values(**values))
    return None if before is None else EpisodeStatus(before)


def mark_failed(session: Session, *, episode_id: str, error: str, commit: bool = True) -> bool:
    """End an unfinished (``pending`` or ``running``) episode as ``failed`` with ``error``; a finished
    one is left as it is. Returns whether the episode was changed (e.g. a dead-lettered submission)."""
    t = _table(Episode)
    unfinished = (EpisodeStatus.PENDING.value, EpisodeStatus.RUNNING.value)
    with _writing(session, commit):
        result = session.execute(
            update(t)
            .where(t.c.id == episode_id, t.c.status.in_(unfinished))
            .values(status=EpisodeStatus.FAILED.value, error=error, finished_at=utcnow())
        )
    return bool(getattr(result, "rowcount", 0))


def save_segment(
    session: Session, *, episode_id: str, segment: SegmentRecord, commit: bool = True
) -> Segment:
    """Store one agent's segment; saving the same ``(episode_id, agent)`` again replaces it."""
    with _writing(session, commit):
        if session.get(Episode, episode_id) is None:
            raise EpisodeNotFound(episode_id)
        _upsert_segments(session, episode_id, [segment])
    row = session.scalars(
        select(Segment)
        .where(Segment.episode_id == episode_id, Segment.agent == segment.agent)
        .execution_options(populate_existing=True)
    ).one()
    return row


def save_segments(session: Session, *, rows: Sequence[tuple[str, SegmentRecord]], commit: bool = True) -> None:
    """Store many ``(episode_id, segment)`` rows in one statement; an ``(episode_id, agent)`` stored
    already is replaced. Every episode must exist."""
    if not rows:
        return
    values = [_segment_values(eid, seg) for eid, seg in rows]
    with _writing(session, commit):
        stmt = _insert(session, Segment)
        stmt = stmt.on_conflict_do_update(
            index_elements=["episode_id", "agent"],
            set_={k: stmt.excluded[k] for k in values[0] if k not in ("episode_id", "agent")},
        )
        session.execute(stmt, values)


def append_segment(
    session: Session,
    *,
    episode_id: str,
    agent: str,
    stored: int,
    ids: Sequence[int],
    mask: Sequence[int],
    text: str,
    generated_tokens: int,
    commit: bool = True,
) -> bool:
    """Append ``ids``, ``mask`` and ``text`` to a stored segment that holds exactly ``stored`` ids now,
    and set its ``generated_tokens``. False (nothing written) when the row is not as expected, or on a
    database that cannot append to a JSON array in place (SQLite): the caller then writes it whole."""
    import json

    from sqlalchemy import text as sql

    if session.get_bind().dialect.name != "postgresql":
        return False
    with _writing(session, commit):
        result = session.execute(
            sql(
                "UPDATE segments SET completion_ids = completion_ids || CAST(:ids AS jsonb), "
                "completion_mask = completion_mask || CAST(:mask AS jsonb), text = text || :text, "
                "generated_tokens = :gen WHERE episode_id = :e AND agent = :a "
                "AND jsonb_array_length(completion_ids) = :n"
            ),
            {
                "ids": json.dumps([int(i) for i in ids]),
                "mask": json.dumps([int(m) for m in mask]),
                "text": text,
                "gen": generated_tokens,
                "e": episode_id,
                "a": agent,
                "n": stored,
            },
        )
    return bool(getattr(result, "rowcount", 0))


def save_episode(
    session: Session,
    *,
    result: EpisodeResult,
    config: dict[str, Any] | None = None,
    live_agents: Collection[str] = (),
    commit: bool = True,
) -> Episode:
    """:func:`store_episode`, then the stored episode, reloaded."""
    store_episode(session, result=result, config=config, live_agents=live_agents, commit=commit)
    return _fresh_episode(session, result.episode_id)


def store_episode(
    session: Session,
    *,
    result: EpisodeResult,
    config: dict[str, Any] | None = None,
    live_agents: Collection[str] = (),
    commit: bool = True,
) -> None:
    """Store a finished episode: the problem, the episode row and every segment, in one transaction.

    Creates the episode if it was never created (embedded runs) or completes the pending/running row;
    ``created_at``, ``started_at`` and (unless ``config`` is given) ``config`` of an existing row are
    kept. Calling it twice with the same result stores the same rows. ``live_agents``: agents whose
    segments were stored whole while the episode ran (with this run's ids): only their clock spans are
    written here.
    """
    walls = [s.wall_start for s in result.segments if s.wall_start > 0]
    ends = [s.wall_end for s in result.segments if s.wall_end > 0]
    finished = _ts(max(ends)) if ends else None
    finished = finished or utcnow()
    started = _ts(min(walls)) if walls else _ts(finished.timestamp() - max(result.wall_time_s, 0.0))
    score = result.score
    rewards = result.rewards
    values: dict[str, Any] = {
        "task": result.problem.task,
        "mode": str(Mode(result.mode)),
        "capacity": result.capacity,
        "model_id": result.model_id,
        "model_version": result.model_version,
        "status": EpisodeStatus(result.status).value,
        "answer": _no_nul(result.answer),
        # an ungraded task (chat) answers without a score: its accuracy stays unset
        "accuracy": None if score is None and result.status is EpisodeStatus.COMPLETED else float(rewards.accuracy),
        "reward_concurrency": float(rewards.concurrency),
        "reward_total": float(rewards.total),
        "format_error": bool(rewards.format_error) or result.status is EpisodeStatus.FORMAT_ERROR,
        "score": None
        if score is None
        else _json(
            {
                "accuracy": score.accuracy,
                "correct": score.correct,
                "needed": score.needed,
                "details": score.details,
            }
        ),
        "latency": int(result.latency),
        "eta": float(result.eta),
        "eta_over_c": float(result.eta_over_c),
        "wall_time_s": float(result.wall_time_s),
        "forks": result.forks,
        "format_errors": _json(result.format_errors),
        "timeline": result.timeline.to_json(),
        "error": _no_nul(result.error),
        "finished_at": finished,
    }
    t = _table(Episode)
    with _writing(session, commit):
        pk = _problem_pk(session, result.problem)
        stmt = _insert(session, Episode).values(
            id=result.episode_id,
            problem_pk=pk,
            config=_json(config or {}),
            created_at=started or finished,
            started_at=started,
            **values,
        )
        set_: dict[str, Any] = dict(values, problem_pk=stmt.excluded.problem_pk)
        set_["started_at"] = func.coalesce(t.c.started_at, stmt.excluded.started_at)
        if config is not None:
            set_["config"] = stmt.excluded.config
        session.execute(stmt.on_conflict_do_update(index_elements=["id"], set_=set_))
        # One set of segments per episode: rows of agents this result does not have (stored live by an
        # earlier run of a redelivered episode, which forked differently) go.
        agents = [s.agent for s in result.segments]
        seg = _table(Segment)
        session.execute(delete(seg).where(seg.c.episode_id == result.episode_id, seg.c.agent.not_in(agents)))
        live = set(live_agents)
        _upsert_segments(session, result.episode_id, [s for s in result.segments if s.agent not in live])
        spans = [
            {"b_e": result.episode_id, "b_a": s.agent, "b_cs": s.clock_start, "b_ce": s.clock_end}
            for s in result.segments
            if s.agent in live
        ]
        if spans:
            session.execute(
                update(seg)
                .where(seg.c.episode_id == bindparam("b_e"), seg.c.agent == bindparam("b_a"))
                .values(clock_start=bindparam("b_cs"), clock_end=bindparam("b_ce")),
                spans,
            )


def get_episode(session: Session, episode_id: str) -> Episode | None:
    return session.get(Episode, episode_id)


def list_episodes(
    session: Session,
    *,
    task: str | None = None,
    mode: Mode | str | None = None,
    status: EpisodeStatus | str | None = None,
    model_version: str | None = None,
    api_key_id: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[Episode], int]:
    """A page of episodes, newest first, and the number of episodes matching the filters
    (``api_key_id``: only those this key submitted)."""
    if limit < 0 or offset < 0:
        raise ValueError(f"limit and offset must be >= 0, got limit={limit}, offset={offset}")
    conditions = []
    if task is not None:
        conditions.append(Episode.task == task)
    if mode is not None:
        conditions.append(Episode.mode == str(Mode(mode)))
    if status is not None:
        conditions.append(Episode.status == EpisodeStatus(status).value)
    if model_version is not None:
        conditions.append(Episode.model_version == model_version)
    if api_key_id is not None:
        conditions.append(Episode.api_key_id == api_key_id)
    total = session.scalar(select(func.count()).select_from(Episode).where(*conditions)) or 0
    rows = session.scalars(
        select(Episode)
        .where(*conditions)
        .order_by(Episode.created_at.desc(), Episode.id.desc())
        .limit(limit)
        .offset(offset)
    ).all()
    return list(rows), int(total)


def episode_segments(session: Session, episode_id: str) -> list[Segment]:
    """The episode's segments in start order (organizer first, workers by fork time)."""
    return list(
        session.scalars(
            select(Segment).where(Segment.episode_id == episode_id).order_by(Segment.clock_start, Segment.id)
        ).all()
    )


def delete_episode(session: Session, *, episode_id: str, commit: bool = True) -> bool:
    """Delete an episode and (by cascade) its segments; ``False`` if there was none."""
    with _writing(session, commit):
        episode = session.get(Episode, episode_id)
        if episode is None:
            return False
        session.delete(episode)
    return True


def segment_record(row: Segment) -> SegmentRecord:
    """A stored segment as the engine's :class:`SegmentRecord` (what the trainer consumes)."""
    return SegmentRecord.model_validate(row, from_attributes=True)


def is_finished(episode: Episode) -> bool:
    return EpisodeStatus(episode.status).finished


# ----------------------------------------------------------------------------- model versions
def record_model_version(
    session: Session,
    *,
    model_id: str,
    version: str,
    path: str,
    kind: str,
    step: int = 0,
    parent_version: str | None = None,
    metrics: dict[str, Any] | None = None,
    commit: bool = True,
) -> ModelVersion:
    """Store a checkpoint (idempotent on ``(model_id, version)``: a second call updates it)."""
    if kind not in MODEL_VERSION_KINDS:
        raise ValueError(f"kind must be one of {', '.join(MODEL_VERSION_KINDS)}, got {kind!r}")
    with _writing(session, commit):
        stmt = _insert(session, ModelVersion).values(
            model_id=model_id,
            version=version,
            path=path,
            kind=kind,
            step=step,
            parent_version=parent_version,
            metrics=_json(metrics or {}),
            created_at=utcnow(),
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=["model_id", "version"],
            set_={k: stmt.excluded[k] for k in ("path", "kind", "step", "parent_version", "metrics")},
        ).returning(_table(ModelVersion).c.id)
        pk = session.execute(stmt).scalar_one()
    row = session.get(ModelVersion, pk, populate_existing=True)
    assert row is not None
    return row


def latest_model_version(session: Session, *, model_id: str, kind: str | None = None) -> ModelVersion | None:
    """The most recently recorded version of ``model_id`` (optionally of one ``kind``)."""
    stmt = select(ModelVersion).where(ModelVersion.model_id == model_id)
    if kind is not None:
        stmt = stmt.where(ModelVersion.kind == kind)
    stmt = stmt.order_by(ModelVersion.created_at.desc(), ModelVersion.id.desc()).limit(1)
    return session.scalars(stmt).first()


# ----------------------------------------------------------------------------- API keys
def create_api_key(
    session: Session,
    *,
    name: str,
    scopes: Sequence[Scope | str],
    rate_limit_per_minute: int | None = None,
    pools: Sequence[str] | None = None,
    commit: bool = True,
) -> tuple[ApiKey, str]:
    """A new key: its row (which holds the key's hash, never the key) and the key itself, to show once.
    ``pools``: for a ``human`` key, the pools of the human queue it works in (None: every pool)."""
    if rate_limit_per_minute is not None and rate_limit_per_minute < 0:
        raise ValueError(f"rate_limit_per_minute must be >= 0 (0: no limit), got {rate_limit_per_minute}")
    key_id, key = generate_key()
    row = ApiKey(
        id=key_id,
        name=name,
        key_hash=hash_key(key),
        scopes=[s.value for s in parse_scopes(str(s) for s in scopes)],
        rate_limit_per_minute=rate_limit_per_minute,
        pools=list(dict.fromkeys(pools)) if pools else None,
        created_at=utcnow(),
    )
    with _writing(session, commit):
        session.add(row)
    return row, key


def get_api_key(session: Session, *, key_id: str) -> ApiKey | None:
    return session.get(ApiKey, key_id)


def list_api_keys(session: Session, *, include_revoked: bool = False) -> list[ApiKey]:
    """Keys, oldest first; revoked ones only when asked for."""
    stmt = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if not include_revoked:
        stmt = stmt.where(ApiKey.revoked_at.is_(None))
    return list(session.scalars(stmt).all())


def revoke_api_key(session: Session, *, key_id: str, commit: bool = True) -> bool:
    """Revoke a key (it stops working at once; its row stays); False if no live key has that id."""
    with _writing(session, commit):
        result = session.execute(
            update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow())
        )
    return bool(getattr(result, "rowcount", 0))
