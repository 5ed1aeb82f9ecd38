"""People in the loop: the human queue (tasks, audit), fork/join plans, segment authors, key pools.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-10
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# JSON on SQLite, JSONB on PostgreSQL (as shared.store.models.JsonType at this revision).
JSON = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")


def _ts(name: str, nullable: bool = True) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _created_at() -> sa.Column:
    return sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False)


def upgrade() -> None:
    op.create_table(
        "human_tasks",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("episode_id", sa.String(length=64), nullable=False),
        sa.Column("agent", sa.String(length=64), nullable=False),
        sa.Column("fork_id", sa.Integer(), nullable=False),
        sa.Column("parent", sa.String(length=64), nullable=False),
        sa.Column("pool", sa.String(length=64), nullable=False),
        sa.Column("task", sa.String(length=64), nullable=False),
        sa.Column("query", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("claimed_by", sa.String(length=32), nullable=True),
        sa.Column("claimed_by_name", sa.String(length=255), nullable=True),
        _ts("lease_until"),
        sa.Column("draft", sa.Text(), nullable=True),
        sa.Column("answer", sa.Text(), nullable=True),
        sa.Column("answered_by", sa.String(length=32), nullable=True),
        sa.Column("answered_by_name", sa.String(length=255), nullable=True),
        _ts("submitted_at"),
        _ts("undo_until"),
        _ts("deadline", nullable=False),
        sa.Column("fallback", sa.String(length=16), nullable=False),
        sa.Column("returned", sa.Text(), nullable=True),
        sa.Column("resolution", sa.String(length=16), nullable=True),
        _created_at(),
        _ts("finished_at"),
        sa.CheckConstraint(
            "status IN ('open', 'claimed', 'submitted', 'done', 'fallback', 'cancelled')",
            name=op.f("ck_human_tasks_status"),
        ),
        sa.CheckConstraint("fallback IN ('model', 'default', 'error')", name=op.f("ck_human_tasks_fallback")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_human_tasks")),
        sa.UniqueConstraint("episode_id", "agent", name="uq_human_tasks_episode_id_agent"),
    )
    op.create_index("ix_human_tasks_status_pool", "human_tasks", ["status", "pool"])
    op.create_index("ix_human_tasks_episode_id", "human_tasks", ["episode_id"])
    op.create_table(
        "human_audit",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("task_id", sa.String(length=32), nullable=False),
        sa.Column("episode_id", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("actor", sa.String(length=32), nullable=True),
        sa.Column("actor_name", sa.String(length=255), nullable=True),
        sa.Column("detail", JSON, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_human_audit")),
    )
    op.create_index("ix_human_audit_task_id", "human_audit", ["task_id"])
    op.create_index("ix_human_audit_episode_id", "human_audit", ["episode_id"])
    op.create_table(
        "plans",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("created_by", sa.String(length=32), nullable=True),
        sa.Column("created_by_name", sa.String(length=255), nullable=True),
        sa.Column("task", sa.String(length=64), nullable=False),
        sa.Column("problem_id", sa.String(length=255), nullable=False),
        sa.Column("payload", JSON, nullable=False),
        sa.Column("settings", JSON, nullable=False),
        sa.Column("proposed", JSON, nullable=False),
        sa.Column("proposal_text", sa.Text(), nullable=False),
        sa.Column("approved", JSON, nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("episode_id", sa.String(length=64), nullable=True),
        _created_at(),
        _ts("approved_at"),
        sa.CheckConstraint("status IN ('draft', 'approved')", name=op.f("ck_plans_status")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_plans")),
    )
    op.create_index("ix_plans_episode_id", "plans", ["episode_id"])
    with op.batch_alter_table("segments") as batch:
        batch.add_column(sa.Column("author", sa.String(length=16), nullable=True))
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("pools", JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("pools")
    with op.batch_alter_table("segments") as batch:
        batch.drop_column("author")
    op.drop_index("ix_plans_episode_id", table_name="plans")
    op.drop_table("plans")
    op.drop_index("ix_human_audit_episode_id", table_name="human_audit")
    op.drop_index("ix_human_audit_task_id", table_name="human_audit")
    op.drop_table("human_audit")
    op.drop_index("ix_human_tasks_episode_id", table_name="human_tasks")
    op.drop_index("ix_human_tasks_status_pool", table_name="human_tasks")
    op.drop_table("human_tasks")
