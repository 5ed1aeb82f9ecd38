"""What the trainer service learns from: finished episodes read back from the store, and their filters.

Episodes come back with the token ids and generated/injected masks the engine recorded
(:class:`StoredEpisode`; :func:`sequences` turns one into training sequences with
:func:`trainer.grpo.losses.episode_sequences`): nothing is re-tokenized. :func:`read_window` pages
through finished episodes of a task in ``(finished_at, id)`` order after a watermark, so consecutive
cycles consume consecutive windows; :func:`read_ids` reads the episodes a GRPO cycle submitted.

:func:`keep_for_sft` is the rejection-sampling filter and :func:`keep_for_grpo` the looser one for a
group (a format error is a signal there, not noise). Both drop, with a reason counted:

* ``failed`` — the episode could not run (a backend failure);
* ``stale`` — a segment was produced (wholly or partly) by a version outside the allowed set: the
  serving version and its ``max_staleness`` ancestors (a segment labelled ``a+b`` needs both);
* ``held_out`` — a problem of the gate's held-out set (training on it would make the gate meaningless);
* ``no_tokens`` — nothing generated to train on (sequences without ids: old rows, live-only segments);

and for SFT also ``format_error`` (unless allowed), ``ungraded``, ``low_accuracy``, ``low_reward``,
``worker_error`` (a worker cut off, timed out or failed: its join injected an error text).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from datetime import datetime
from types import SimpleNamespace
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session, selectinload

from shared.backends.base import split_version_label
from shared.messages import FINISHED_STATUSES, EpisodeStatus, SegmentRecord
from shared.protocol import ErrorKind
from shared.store.models import Episode
from shared.store.repository import segment_record
from trainer.grpo.losses import Sequence, episode_sequences
from trainer.service.config import TrainerServiceConfig

_FINISHED = tuple(s.value for s in FINISHED_STATUSES)
BENIGN_SEGMENT_ERRORS = frozenset({"cancelled"})  # a worker its organizer no longer needed
FORMAT_KINDS = frozenset(k.value for k in ErrorKind)  # a segment's error may be its first format error


@dataclass
class StoredEpisode:
    """A finished episode as the store holds it, segments with their ids and masks."""

    id: str
    task: str
    problem_id: str
    mode: str
    status: str
    accuracy: float | None
    reward: float
    format_error: bool
    model_version: str | None
    finished_at: datetime | None
    segments: list[SegmentRecord] = field(default_factory=list)

    @property
    def versions(self) -> list[str]:
        """Every version that produced a token of this episode (segments with generated tokens)."""
        out: list[str] = []
        for seg in self.segments:
            if seg.generated_tokens or any(seg.completion_mask):
                for v in split_version_label(seg.model_version):
                    if v not in out:
                        out.append(v)
        return out

    @property
    def worker_failed(self) -> bool:
        """A worker segment ended with an error that is not a format error (abort, timeout, failure)."""
        return any(
            seg.role == "worker" and seg.error and seg.error not in BENIGN_SEGMENT_ERRORS and seg.error not in FORMAT_KINDS
            for seg in self.segments
        )


def _stored(row: Episode) -> StoredEpisode:
    return StoredEpisode(
        id=row.id,
        task=row.task,
        problem_id=row.problem.problem_id,
        mode=row.mode,
        status=row.status,
        accuracy=row.accuracy,
        reward=float(row.reward_total or 0.0),
        format_error=bool(row.format_error),
        model_version=row.model_version,
        finished_at=row.finished_at,
        segments=[segment_record(s) for s in row.segments],
    )


def read_window(
    session: Session, *, task: str, after: tuple[datetime, str] | None, limit: int
) -> list[StoredEpisode]:
    """Up to ``limit`` finished episodes of ``task`` after the ``(finished_at, id)`` watermark, in order."""
    stmt = select(Episode).where(Episode.task == task, Episode.status.in_(_FINISHED), Episode.finished_at.is_not(None))
    if after is not None:
        at, eid = after
        stmt = stmt.where(or_(Episode.finished_at > at, and_(Episode.finished_at == at, Episode.id > eid)))
    stmt = stmt.order_by(Episode.finished_at, Episode.id).limit(limit).options(selectinload(Episode.segments))
    return [_stored(row) for row in session.scalars(stmt).all()]


def read_ids(session: Session, ids: list[str]) -> dict[str, StoredEpisode]:
    """The finished episodes among ``ids``."""
    if not ids:
        return {}
    stmt = (
        select(Episode)
        .where(Episode.id.in_(ids), Episode.status.in_(_FINISHED))
        .options(selectinload(Episode.segments))
        .execution_options(populate_existing=True)
    )
    return {row.id: _stored(row) for row in session.scalars(stmt).all()}


def sequences(episode: StoredEpisode) -> list[Sequence]:
    """The episode's training sequences: its stored ids and masks, one per agent with generated tokens."""
    return episode_sequences(SimpleNamespace(segments=episode.segments))


def _common(ep: StoredEpisode, allowed: set[str], held_out: set[str]) -> str | None:
    if ep.status == EpisodeStatus.FAILED.value:
        return "failed"
    if ep.problem_id in held_out:
        return "held_out"
    versions = ep.versions
    if not versions or any(v not in allowed for v in versions):
        return "stale"
    if not sequences(ep):
        return "no_tokens"
    return None


def keep_for_sft(
    ep: StoredEpisode, config: TrainerServiceConfig, *, allowed: set[str], held_out: set[str]
) -> str | None:
    """Why an episode is not a good trace to imitate (None: keep it)."""
    if ep.mode not in ("asyncthink", "sequential"):
        return "mode"
    if ep.status == EpisodeStatus.FORMAT_ERROR.value or ep.format_error:
        if not config.allow_format_errors:
            return "format_error"
    elif ep.accuracy is None:
        return "ungraded"
    elif ep.accuracy < config.min_accuracy:
        return "low_accuracy"
    if config.min_reward is not None and ep.reward < config.min_reward:
        return "low_reward"
    if ep.worker_failed:
        return "worker_error"
    return _common(ep, allowed, held_out)


def keep_for_grpo(ep: StoredEpisode, *, allowed: set[str], held_out: set[str]) -> str | None:
    """Why an episode of a GRPO group cannot be trained on (None: keep it)."""
    return _common(ep, allowed, held_out)


def count(reasons: list[str | None]) -> dict[str, int]:
    return dict(collections.Counter(r for r in reasons if r is not None))


def window_record(
    *, first: datetime | None, last: tuple[datetime, str] | None, seen: int, used: list[StoredEpisode],
    skipped: dict[str, int],
) -> dict[str, Any]:  # fmt: skip
    """The ``data_window`` a version records: the range scanned, the episodes used, why the rest were not."""
    versions: dict[str, int] = dict(collections.Counter(v for e in used for v in e.versions))
    return {
        "from": first.isoformat() if first else None,
        "to": last[0].isoformat() if last else None,
        "last_id": last[1] if last else None,
        "seen": seen,
        "used": len(used),
        "skipped": dict(skipped),
        "episode_ids": [e.id for e in used],
        "versions": versions,
        "mean_reward": _mean([e.reward for e in used]),
        "mean_accuracy": _mean([e.accuracy for e in used if e.accuracy is not None]),
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
