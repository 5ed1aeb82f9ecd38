"""The version registry on ``model_versions``: which version serves, each version's history and metrics.

No schema of its own: a row of ``model_versions`` is a version (``model_id``, ``version``, ``path``,
``parent_version``, ``step``, ``kind``) and everything else the trainer service knows about it lives in
its JSON ``metrics`` column, under these keys:

* ``status``: ``serving`` (exactly one row per ``model_id`` while the trainer runs), ``published`` (it
  served before), ``rejected`` (the gate refused it), ``rolled_back`` (it served and was rolled back),
  ``swap_failed`` (the fleet could not load it), ``superseded`` (the serving version changed while its
  cycle ran), ``candidate`` (registered, not yet decided);
* ``served``: ``[[start, end], ...]`` unix times it served; the open interval (``end`` null) marks the
  serving version;
* ``content_hash``: sha256 of its weight files (:func:`shared.weights.content_hash`);
* ``cycle``, ``method``: the trainer cycle and its method (``sft`` | ``grpo``) that produced it;
* ``data_window``: what the cycle trained on (``from`` / ``to`` finished-at times, the episode ids used,
  counts seen / used / skipped by reason, the versions the data came from);
* ``train``, ``gate``, ``post_swap``: the update's statistics, the held-out comparison with the serving
  version (both scores, the metric, the tolerance, the decision) and the check after the swap;
* ``eval``: held-out scores of this version, keyed by the evaluation's fingerprint (reused as the
  serving side of later gates);
* ``events``: ``[{"ts", "event", ...}]``, every transition (registered, gate, published, promoted,
  rolled back, swap failed) in order.

So a segment's ``model_version`` leads to its row, and the row to its checkpoint and hash. Writers
change ``metrics`` by assigning a new dict (SQLAlchemy does not see in-place changes of a JSON value).

Limits: the trainer service is the one writer (operators act through it); two writers changing the same
row at once would lose one change.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.store.models import ModelVersion
from shared.store.repository import record_model_version

SERVING = "serving"


def get_version(session: Session, *, model_id: str, version: str) -> ModelVersion | None:
    return session.scalars(
        select(ModelVersion)
        .where(ModelVersion.model_id == model_id, ModelVersion.version == version)
        .execution_options(populate_existing=True)
    ).one_or_none()


def find_version(session: Session, *, version: str, model_id: str | None = None) -> ModelVersion | None:
    """A version by its label (within ``model_id`` when given; the newest row of that label otherwise)."""
    stmt = select(ModelVersion).where(ModelVersion.version == version)
    if model_id is not None:
        stmt = stmt.where(ModelVersion.model_id == model_id)
    stmt = stmt.order_by(ModelVersion.id.desc()).execution_options(populate_existing=True)
    return session.scalars(stmt).first()


def list_versions(session: Session, *, model_id: str | None = None) -> list[ModelVersion]:
    """Every version (of ``model_id``), oldest first."""
    stmt = select(ModelVersion).order_by(ModelVersion.created_at, ModelVersion.id)
    if model_id is not None:
        stmt = stmt.where(ModelVersion.model_id == model_id)
    return list(session.scalars(stmt.execution_options(populate_existing=True)).all())


def by_cycle(session: Session, *, cycle: int, model_id: str | None = None) -> list[ModelVersion]:
    """The versions a trainer cycle produced (normally one)."""
    return [v for v in list_versions(session, model_id=model_id) if (v.metrics or {}).get("cycle") == cycle]


def serving_version(session: Session, *, model_id: str) -> ModelVersion | None:
    """The version that serves now (the one with an open ``served`` interval), if any."""
    for row in reversed(list_versions(session, model_id=model_id)):
        served = (row.metrics or {}).get("served") or []
        if served and served[-1][1] is None:
            return row
    return None


def register(
    session: Session,
    *,
    model_id: str,
    version: str,
    path: str,
    kind: str,
    parent: str | None = None,
    step: int = 0,
    metrics: dict[str, Any] | None = None,
) -> ModelVersion:
    """Store a version (``status`` defaults to ``candidate``) with a ``registered`` event."""
    values = dict(metrics or {})
    values.setdefault("status", "candidate")
    values.setdefault("served", [])
    values["events"] = [*values.get("events", []), {"ts": time.time(), "event": "registered"}]
    return record_model_version(
        session, model_id=model_id, version=version, path=path, kind=kind, step=step,
        parent_version=parent, metrics=values,
    )  # fmt: skip


def patch(
    session: Session,
    *,
    model_id: str,
    version: str,
    values: dict[str, Any] | None = None,
    event: str | None = None,
    **detail: Any,
) -> ModelVersion:
    """Merge ``values`` into a version's metrics and append ``event`` (with ``detail``); commits."""
    row = get_version(session, model_id=model_id, version=version)
    if row is None:
        raise LookupError(f"no version {version!r} of {model_id!r} in model_versions")
    metrics = dict(row.metrics or {})
    metrics.update(values or {})
    if event is not None:
        metrics["events"] = [*metrics.get("events", []), {"ts": time.time(), "event": event, **detail}]
    row.metrics = metrics
    session.commit()
    return row


def set_serving(
    session: Session, *, model_id: str, version: str, event: str, **detail: Any
) -> tuple[ModelVersion | None, ModelVersion]:
    """Make ``version`` the serving one: close the open interval of the one serving now (its status
    becomes ``published``, or ``rolled_back`` when ``event`` is a rollback away from it), open one on
    ``version`` (status ``serving``); both get ``event``. Returns (previous, new). One transaction."""
    row = get_version(session, model_id=model_id, version=version)
    if row is None:
        raise LookupError(f"no version {version!r} of {model_id!r} in model_versions")
    now = time.time()
    previous = serving_version(session, model_id=model_id)
    if previous is not None and previous.id != row.id:
        m = dict(previous.metrics or {})
        served = [list(s) for s in m.get("served", [])]
        served[-1][1] = now
        m["served"] = served
        m["status"] = "rolled_back" if event == "rolled_back" else "published"
        m["events"] = [*m.get("events", []), {"ts": now, "event": f"{event}_away", "to": version, **detail}]
        previous.metrics = m
    if previous is None or previous.id != row.id:
        m = dict(row.metrics or {})
        m["served"] = [*[list(s) for s in m.get("served", [])], [now, None]]
        m["status"] = SERVING
        m["events"] = [
            *m.get("events", []),
            {"ts": now, "event": event, "from": previous.version if previous else None, **detail},
        ]
        row.metrics = m
    session.commit()
    return (previous if previous is not None and previous.id != row.id else None), row


def lineage(session: Session, *, model_id: str, version: str, depth: int = 1000) -> list[str]:
    """``version``, its parent, the parent's parent ... (at most ``depth`` entries)."""
    rows = {r.version: r for r in list_versions(session, model_id=model_id)}
    chain: list[str] = []
    current: str | None = version
    while current is not None and current in rows and current not in chain and len(chain) < depth:
        chain.append(current)
        current = rows[current].parent_version
    return chain


def public(row: ModelVersion) -> dict[str, Any]:
    """A version as plain JSON (REST and CLI)."""
    metrics = dict(row.metrics or {})
    return {
        "model_id": row.model_id,
        "version": row.version,
        "kind": row.kind,
        "parent_version": row.parent_version,
        "path": row.path,
        "step": row.step,
        "status": metrics.get("status"),
        "cycle": metrics.get("cycle"),
        "content_hash": metrics.get("content_hash"),
        "created_at": row.created_at.isoformat() if row.created_at else None,
        "metrics": metrics,
    }
