"""Small assertions shared by test modules."""

from __future__ import annotations

from collections.abc import Iterable

from shared.protocol import Fork, Join, Role, parse
from trainer.synth.records import TraceRecord


def peak_active_workers(records: Iterable[TraceRecord], capacity: int) -> int:
    """The most workers any organizer record keeps forked-and-not-joined at once; every record must parse
    without format errors at ``capacity``."""
    most = 0
    for rec in records:
        if rec.kind != "organizer":
            continue
        events, errors = parse(rec.completion, Role.ORGANIZER, capacity=capacity)
        assert errors == [], (rec.problem_id, errors)
        active = 0
        for e in events:
            active += 1 if isinstance(e, Fork) else -1 if isinstance(e, Join) else 0
            most = max(most, active)
    return most
