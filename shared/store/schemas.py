"""API schemas for stored traces (REST gateway, CLI), kept apart from the tables.

Built from ORM rows with ``Model.model_validate(row)`` (``from_attributes``). ``EpisodeSummary`` is a
list row (no timeline, no token ids); ``EpisodePublic`` is the whole episode with its problem and,
when asked for, its segments; ``SegmentPublic`` carries token ids and masks exactly as stored.

Limits: these are read models only; requests that create episodes are validated by the gateway.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _FromRow(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class ProblemPublic(_FromRow):
    task: str  # "countdown", "sudoku", "math"
    problem_id: str  # Problem.id
    payload: dict[str, Any]  # task-specific fields
    reference: Any = None  # the known answer, where there is one


class SegmentPublic(_FromRow):
    agent: str  # "organizer", "trace-1", "1", "1.2"
    role: str  # organizer | worker
    fork_id: int | None = None
    parent: str | None = None
    endpoint: str | None = None
    query: str | None = None
    prompt: str = ""
    prompt_ids: list[int] = Field(default_factory=list)
    completion_ids: list[int] = Field(default_factory=list)
    completion_mask: list[int] = Field(default_factory=list)  # 1 generated, 0 injected by a Join
    text: str = ""
    returned: str | None = None
    generated_tokens: int = 0
    clock_start: int = 0  # organizer clock (decoded tokens)
    clock_end: int = 0
    wall_start: float = 0.0  # unix time
    wall_end: float = 0.0
    error: str | None = None
    model_version: str | None = None


class EpisodeSummary(_FromRow):
    id: str  # the episode id
    task: str
    problem_id: str
    mode: str  # asyncthink | sequential | parallel
    capacity: int  # agent pool size c
    model_id: str
    model_version: str | None = None
    status: str  # pending | running | completed | format_error | failed
    answer: str | None = None
    accuracy: float | None = None  # R_A
    reward_total: float | None = None  # R
    format_error: bool = False
    latency: int | None = None  # T, critical-path latency in decoded tokens
    eta: float | None = None  # thinking concurrency η
    eta_over_c: float | None = None
    wall_time_s: float | None = None
    forks: int = 0
    created_at: datetime
    finished_at: datetime | None = None


class EpisodePublic(EpisodeSummary):
    problem: ProblemPublic
    reward_concurrency: float | None = None  # R_η
    score: dict[str, Any] | None = None  # accuracy, correct, needed, details
    format_errors: list[dict[str, Any]] = Field(default_factory=list)
    timeline: list[Any] | None = None  # Timeline.to_json()
    error: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)  # the request's budgets and sampling
    started_at: datetime | None = None
    segments: list[SegmentPublic] = Field(default_factory=list)  # empty unless include_segments

    @classmethod
    def from_row(cls, episode: Any, *, include_segments: bool = True) -> EpisodePublic:
        """Build from an ``Episode`` row; ``include_segments=False`` skips loading the segments."""
        data = EpisodeSummary.model_validate(episode).model_dump()
        extra = {
            name: getattr(episode, name)
            for name in (
                "reward_concurrency",
                "score",
                "format_errors",
                "timeline",
                "error",
                "config",
                "started_at",
            )
        }
        return cls(
            **data,
            **extra,
            problem=ProblemPublic.model_validate(episode.problem),
            segments=[SegmentPublic.model_validate(s) for s in episode.segments] if include_segments else [],
        )


class ModelVersionPublic(_FromRow):
    model_id: str
    version: str
    path: str
    parent_version: str | None = None
    step: int = 0
    kind: str  # init | sft | grpo
    metrics: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime
