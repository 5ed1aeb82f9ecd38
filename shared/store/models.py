"""SQLAlchemy 2 tables for traces (problems, episodes, segments, model versions), the gateway's API keys,
and people in the loop (the human queue's tasks and its audit, fork/join plans).

The same models run on SQLite (the embedded default) and PostgreSQL (the services): JSON columns are
``JSON`` everywhere and ``JSONB`` on PostgreSQL, enumerations are strings guarded by CHECK constraints,
and every constraint has a deterministic name (``NAMING_CONVENTION``) so Alembic's batch mode can
rebuild SQLite tables.

Token ids and masks are stored exactly as the engine produced them (JSON lists of ints): training
reads them back and never re-tokenizes text. A segment is unique per ``(episode_id, agent)`` so a
re-delivered segment replaces the stored one instead of duplicating it.

Limits: these are tables only; reading and writing goes through :mod:`shared.store.repository`, and
the schema changes only through a migration in ``shared/store/migrations/versions``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator, TypeEngine

from shared.messages import EpisodeStatus

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

EPISODE_STATUSES = tuple(s.value for s in EpisodeStatus)  # the CHECK constraint on episodes.status
MODEL_VERSION_KINDS = ("init", "sft", "grpo")

# JSON on SQLite, JSONB on PostgreSQL; Python None is stored as SQL NULL, not the JSON literal null.
JsonType: TypeEngine[Any] = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite keeps no zone: naive values are UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ProblemRow(Base):
    """A task instance; episodes reference it. ``(task, problem_id)`` is the natural key."""

    __tablename__ = "problems"
    __table_args__ = (UniqueConstraint("task", "problem_id", name="uq_problems_task_problem_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task: Mapped[str] = mapped_column(String(64))  # "countdown", "sudoku", "math"
    problem_id: Mapped[str] = mapped_column(String(255))  # Problem.id, unique within the task
    payload: Mapped[dict[str, Any]] = mapped_column(JsonType)  # Problem.payload
    reference: Mapped[Any | None] = mapped_column(JsonType, nullable=True)  # Problem.reference
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, server_default=func.now())

    episodes: Mapped[list[Episode]] = relationship(back_populates="problem")


class Episode(Base):
    """One run of the engine on one problem: its status, answer, rewards, metrics and config."""

    __tablename__ = "episodes"
    __table_args__ = (
        CheckConstraint(_in("status", EPISODE_STATUSES), name="status"),
        Index("ix_episodes_task_mode", "task", "mode"),
        Index("ix_episodes_status", "status"),
        Index("ix_episodes_created_at", "created_at"),
        Index("ix_episodes_model_version", "model_version"),
        Index("ix_episodes_api_key_id", "api_key_id"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the engine's episode_id
    problem_pk: Mapped[int] = mapped_column(ForeignKey("problems.id", ondelete="RESTRICT"), index=True)
    task: Mapped[str] = mapped_column(String(64))
    mode: Mapped[str] = mapped_column(String(32))  # asyncthink | sequential | parallel
    capacity: Mapped[int] = mapped_column(Integer)  # agent pool size c
    model_id: Mapped[str] = mapped_column(String(255))
    model_version: Mapped[str | None] = mapped_column(String(255), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default=EpisodeStatus.PENDING.value)

    answer: Mapped[str | None] = mapped_column(Text, nullable=True)
    accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)  # R_A
    reward_concurrency: Mapped[float | None] = mapped_column(Float, nullable=True)  # R_η
    reward_total: Mapped[float | None] = mapped_column(Float, nullable=True)  # R
    format_error: Mapped[bool] = mapped_column(Boolean, default=False)
    score: Mapped[dict[str, Any] | None] = mapped_column(JsonType, nullable=True)  # correct, needed, details

    latency: Mapped[int | None] = mapped_column(Integer, nullable=True)  # T, in decoded tokens
    eta: Mapped[float | None] = mapped_column(Float, nullable=True)  # η
    eta_over_c: Mapped[float | None] = mapped_column(Float, nullable=True)
    wall_time_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    forks: Mapped[int] = mapped_column(Integer, default=0)
    format_errors: Mapped[list[dict[str, Any]]] = mapped_column(JsonType, default=list)
    timeline: Mapped[list[Any] | None] = mapped_column(JsonType, nullable=True)  # Timeline.to_json()
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    config: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)  # budgets, sampling of the request
    # the API key that submitted it (ApiKey.id, or "admin" for the bootstrap key); None: no key (the CLI,
    # a gateway without keys). Not a foreign key: the bootstrap admin key has no row.
    api_key_id: Mapped[str | None] = mapped_column(String(32), nullable=True)

    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    problem: Mapped[ProblemRow] = relationship(back_populates="episodes", lazy="joined")
    segments: Mapped[list[Segment]] = relationship(
        back_populates="episode",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="(Segment.clock_start, Segment.id)",
    )

    @property
    def problem_id(self) -> str:
        """The problem's natural id (``Problem.id``), for schemas and the CLI."""
        return self.problem.problem_id


class Segment(Base):
    """One agent's sequence in an episode (organizer, worker, or parallel trace) with its token ids."""

    __tablename__ = "segments"
    __table_args__ = (UniqueConstraint("episode_id", "agent", name="uq_segments_episode_id_agent"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    episode_id: Mapped[str] = mapped_column(ForeignKey("episodes.id", ondelete="CASCADE"))
    agent: Mapped[str] = mapped_column(String(64))  # "organizer", "trace-1", "1", "1.2"
    role: Mapped[str] = mapped_column(String(16))  # organizer | worker
    fork_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    parent: Mapped[str | None] = mapped_column(String(64), nullable=True)
    endpoint: Mapped[str | None] = mapped_column(String(64), nullable=True)
    query: Mapped[str | None] = mapped_column(Text, nullable=True)
    prompt: Mapped[str] = mapped_column(Text, default="")
    prompt_ids: Mapped[list[int]] = mapped_column(JsonType, default=list)
    completion_ids: Mapped[list[int]] = mapped_column(JsonType, default=list)
    completion_mask: Mapped[list[int]] = mapped_column(JsonType, default=list)  # 1 generated, 0 injected
    text: Mapped[str] = mapped_column(Text, default="")
    returned: Mapped[str | None] = mapped_column(Text, nullable=True)
    generated_tokens: Mapped[int] = mapped_column(Integer, default=0)
    clock_start: Mapped[int] = mapped_column(Integer, default=0)
    clock_end: Mapped[int] = mapped_column(Integer, default=0)
    wall_start: Mapped[float] = mapped_column(Float, default=0.0)
    wall_end: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    model_version: Mapped[str | None] = mapped_column(String(255), nullable=True)
    # "human": a person wrote this agent's text (its mask-1 tokens are theirs, not the model's); None: the
    # model or a tool. Trainers that need on-policy tokens skip human segments; SFT may use them.
    author: Mapped[str | None] = mapped_column(String(16), nullable=True)

    episode: Mapped[Episode] = relationship(back_populates="segments")


class ModelVersion(Base):
    """A checkpoint the trainer produced (or the initial model), so each trace knows its weights."""

    __tablename__ = "model_versions"
    __table_args__ = (
        UniqueConstraint("model_id", "version", name="uq_model_versions_model_id_version"),
        CheckConstraint(_in("kind", MODEL_VERSION_KINDS), name="kind"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[str] = mapped_column(String(255))
    version: Mapped[str] = mapped_column(String(255))
    path: Mapped[str] = mapped_column(Text)  # where the weights live
    parent_version: Mapped[str | None] = mapped_column(String(255), nullable=True)
    step: Mapped[int] = mapped_column(Integer, default=0)  # optimizer step that produced it
    kind: Mapped[str] = mapped_column(String(16))  # init | sft | grpo
    metrics: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, server_default=func.now())


class ApiKey(Base):
    """A gateway API key: its id, name, scopes and rate limit, and the SHA-256 of the key (never the key).

    Revoking sets ``revoked_at``; rows are kept, so episodes keep naming the key that submitted them.
    """

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # 12 hex characters, inside the key
    name: Mapped[str] = mapped_column(String(255))
    key_hash: Mapped[str] = mapped_column(String(64))  # shared.auth.hash_key(key)
    scopes: Mapped[list[str]] = mapped_column(JsonType)  # shared.auth.Scope values
    rate_limit_per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True)  # None: the default
    # scope human: the pools of the human queue this key works in; None: every pool
    pools: Mapped[list[str] | None] = mapped_column(JsonType, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, server_default=func.now())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


# ----------------------------------------------------------------------------- people in the loop
HUMAN_TASK_STATUSES = ("open", "claimed", "submitted", "done", "fallback", "cancelled")
HUMAN_FALLBACKS = ("model", "default", "error")
PLAN_STATUSES = ("draft", "approved")


class HumanTask(Base):
    """A fork to ``@human`` (or ``@human:POOL``) waiting for a person, and what became of it.

    ``open`` → ``claimed`` (a person holds a lease until ``lease_until``; a lapsed lease counts as open) →
    ``submitted`` (the answer; the person may take it back until ``undo_until``) → ``done`` (the join has
    consumed it); or, when ``deadline`` passes first, ``fallback`` (the configured fallback answered); or
    ``cancelled`` (the episode ended without joining it). Unique per ``(episode_id, agent)``, so a re-run
    episode finds its task again. ``episode_id`` is not a foreign key: a task may be created before an
    embedded run stores its episode.
    """

    __tablename__ = "human_tasks"
    __table_args__ = (
        UniqueConstraint("episode_id", "agent", name="uq_human_tasks_episode_id_agent"),
        CheckConstraint(_in("status", HUMAN_TASK_STATUSES), name="status"),
        CheckConstraint(_in("fallback", HUMAN_FALLBACKS), name="fallback"),
        Index("ix_human_tasks_status_pool", "status", "pool"),
        Index("ix_human_tasks_episode_id", "episode_id"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    episode_id: Mapped[str] = mapped_column(String(64))
    agent: Mapped[str] = mapped_column(String(64))  # the worker's agent name ("2", "1.3")
    fork_id: Mapped[int] = mapped_column(Integer)
    parent: Mapped[str] = mapped_column(String(64))
    pool: Mapped[str] = mapped_column(String(64), default="default")
    task: Mapped[str] = mapped_column(String(64))  # the episode's task name
    query: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="open")
    claimed_by: Mapped[str | None] = mapped_column(String(32), nullable=True)  # ApiKey.id of the holder
    claimed_by_name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    draft: Mapped[str | None] = mapped_column(Text, nullable=True)  # the partial answer, saved as it is typed
    answer: Mapped[str | None] = mapped_column(Text, nullable=True)
    answered_by: Mapped[str | None] = mapped_column(String(32), nullable=True)
    answered_by_name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    submitted_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    undo_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    deadline: Mapped[datetime] = mapped_column(UTCDateTime())
    fallback: Mapped[str] = mapped_column(String(16), default="model")  # model | default | error
    returned: Mapped[str | None] = mapped_column(Text, nullable=True)  # what the join received
    resolution: Mapped[str | None] = mapped_column(String(16), nullable=True)  # human|model|default|error|cancelled
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class HumanAudit(Base):
    """Every claim, release, lease expiry, submit, undo, consumption, deadline and fallback of a human task."""

    __tablename__ = "human_audit"
    __table_args__ = (
        Index("ix_human_audit_task_id", "task_id"),
        Index("ix_human_audit_episode_id", "episode_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(String(32))
    episode_id: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(32))  # created, claim, release, lease_expired, submit, undo, ...
    actor: Mapped[str | None] = mapped_column(String(32), nullable=True)  # ApiKey.id; None: the system
    actor_name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, server_default=func.now())


class PlanRow(Base):
    """A fork/join plan: proposed by the model for a problem, edited and approved by a person; the approved
    one runs as ``episode_id`` (whose stored config carries it too)."""

    __tablename__ = "plans"
    __table_args__ = (
        CheckConstraint(_in("status", PLAN_STATUSES), name="status"),
        Index("ix_plans_episode_id", "episode_id"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created_by: Mapped[str | None] = mapped_column(String(32), nullable=True)  # ApiKey.id
    created_by_name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    task: Mapped[str] = mapped_column(String(64))
    problem_id: Mapped[str] = mapped_column(String(255))
    payload: Mapped[dict[str, Any]] = mapped_column(JsonType)
    settings: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)  # EpisodeSettings as JSON
    proposed: Mapped[dict[str, Any]] = mapped_column(JsonType)  # shared.plans.Plan as JSON
    proposal_text: Mapped[str] = mapped_column(Text, default="")  # the organizer text it was read from
    approved: Mapped[dict[str, Any] | None] = mapped_column(JsonType, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="draft")
    episode_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, server_default=func.now())
    approved_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
