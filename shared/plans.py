"""Fork/join plans: the skeleton an organizer intends, proposed by the model and edited by a person.

A :class:`Plan` is an ordered list of steps, each a fork (its id, sub-query, endpoint and, optionally, the
most tokens its worker may decode) or a join of an earlier fork. Before an episode runs, the model proposes
one (:func:`plan_from_text` reads it out of an organizer's text); a person edits it (adds, removes or
reorders steps, rewrites a sub-query, moves a branch to a person or a tool, sets budgets), sees
:func:`plan_diff`, and approves it; the organizer then runs with :func:`plan_prompt` in its context, and
:func:`deviations` says where the run left the plan.

Rules a plan must keep (:func:`check_plan`): fork ids are positive and used once; a join names an earlier,
not yet joined fork; at most ``capacity - 1`` forks are open at any step (the protocol's pool rule);
sub-queries are non-empty; endpoints are ones the deployment serves.

Pure: no I/O.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.episode import MAX_BUDGET

MAX_PLAN_STEPS = 64
MAX_PLAN_QUERY_CHARS = 4000
MAX_FORK_ID = 999_999_999  # the protocol's ids have at most 9 digits

PLAN_HEADER = "Approved plan (fork/join skeleton):"


class PlanStep(BaseModel):
    """One step of a plan: a fork or a join."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["fork", "join"]
    fork_id: int = Field(ge=1, le=MAX_FORK_ID)  # i of <FORK-i> / <JOIN-i>
    query: str = Field("", max_length=MAX_PLAN_QUERY_CHARS)  # a fork's sub-query
    endpoint: str | None = Field(None, max_length=64)  # a fork's worker: None = the model, "python", "human[:POOL]"
    budget: int | None = Field(None, ge=1, le=MAX_BUDGET)  # a fork's worker budget; None = the episode's

    def label(self) -> str:
        """``fork 2 → python: 6*7 (budget 64)`` or ``join 2``."""
        if self.kind == "join":
            return f"join {self.fork_id}"
        budget = f" (budget {self.budget})" if self.budget else ""
        return f"fork {self.fork_id} → {self.endpoint or 'model'}: {self.query}{budget}"


class Plan(BaseModel):
    """An ordered fork/join skeleton."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: tuple[PlanStep, ...] = Field((), max_length=MAX_PLAN_STEPS)

    def forks(self) -> dict[int, PlanStep]:
        return {s.fork_id: s for s in self.steps if s.kind == "fork"}


def plan_from_text(text: str) -> Plan:
    """The forks and joins of an organizer's text, in order (format errors are ignored: a proposal is a
    draft for a person to edit)."""
    from shared.protocol import Fork, Join, Role, parse

    events, _ = parse(text, Role.ORGANIZER, capacity=MAX_PLAN_STEPS + 1)
    steps: list[PlanStep] = []
    for ev in events:
        if len(steps) == MAX_PLAN_STEPS:
            break
        if isinstance(ev, Fork):
            steps.append(
                PlanStep(kind="fork", fork_id=ev.fork_id, query=ev.query.strip()[:MAX_PLAN_QUERY_CHARS], endpoint=ev.endpoint)
            )
        elif isinstance(ev, Join):
            steps.append(PlanStep(kind="join", fork_id=ev.fork_id))
    return Plan(steps=tuple(steps))


def check_plan(plan: Plan, *, capacity: int, endpoints: Iterable[str | None] | None = None) -> list[str]:
    """What is wrong with ``plan`` (empty when nothing is); ``endpoints``: the served ones (None: any)."""
    known = None if endpoints is None else {e or None for e in endpoints}
    problems: list[str] = []
    forked: set[int] = set()
    open_: set[int] = set()
    for n, step in enumerate(plan.steps, 1):
        where = f"step {n} ({step.label()[:60]})"
        if step.kind == "fork":
            if step.fork_id in forked:
                problems.append(f"{where}: fork id {step.fork_id} is used twice")
            if not step.query.strip():
                problems.append(f"{where}: the sub-query is empty")
            if known is not None and step.endpoint not in known:
                names = ", ".join(sorted(e or "model" for e in known))
                problems.append(f"{where}: no worker endpoint {step.endpoint!r}; served: {names}")
            forked.add(step.fork_id)
            open_.add(step.fork_id)
            if len(open_) > capacity - 1:
                problems.append(
                    f"{where}: {len(open_)} forks open at once; capacity {capacity} allows {max(capacity - 1, 0)}"
                )
        else:
            if step.fork_id not in open_:
                reason = "is already joined" if step.fork_id in forked else "is not forked before it"
                problems.append(f"{where}: fork {step.fork_id} {reason}")
            open_.discard(step.fork_id)
    return problems


def plan_prompt(plan: Plan) -> str:
    """The plan as the organizer reads it, appended to its prompt (one line per step, no protocol tags,
    so nothing in the prompt looks like an action already taken)."""
    lines = [PLAN_HEADER, *(f"- {step.label()}" for step in plan.steps)]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class DiffLine:
    op: Literal["same", "changed", "added", "removed", "moved"]
    text: str  # the step as it is now (as it was, for a removed one)
    before: str | None = None  # a changed step as it was
    moved: bool = False  # a changed step whose place among the others changed too


def _key(step: PlanStep) -> tuple[str, int]:
    return step.kind, step.fork_id


def plan_diff(before: Plan, after: Plan) -> list[DiffLine]:
    """How ``after`` differs from ``before``, step by step: steps are matched by kind and fork id; a matched
    step whose sub-query, endpoint or budget changed is ``changed``; one whose place among the others
    changed is ``moved``."""
    old = {_key(s): s for s in before.steps}
    new = {_key(s): s for s in after.steps}
    a = [_key(s) for s in before.steps]
    b = [_key(s) for s in after.steps]
    kept: set[tuple[str, int]] = set()
    for block in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_matching_blocks():
        kept.update(b[block.b : block.b + block.size])
    lines: list[DiffLine] = []
    for step in after.steps:
        key = _key(step)
        was = old.get(key)
        if was is None:
            lines.append(DiffLine("added", step.label()))
        elif was != step:
            lines.append(DiffLine("changed", step.label(), was.label(), moved=key not in kept))
        elif key not in kept:
            lines.append(DiffLine("moved", step.label()))
        else:
            lines.append(DiffLine("same", step.label()))
    lines += [DiffLine("removed", s.label()) for s in before.steps if _key(s) not in new]
    return lines


def deviations(plan: Plan, executed: Plan) -> list[str]:
    """Where a run (``executed``, read from its organizer's text) left the approved ``plan``; empty when it
    followed it step for step. A fork's endpoint is compared as the worker that ran it (``executed``
    should carry the endpoints the forks were sent to)."""
    out: list[str] = []
    planned = [_key(s) for s in plan.steps]
    done = [_key(s) for s in executed.steps]
    if planned != done:
        out.append(
            "order: planned " + ", ".join(f"{k} {i}" for k, i in planned) + "; ran " + ", ".join(f"{k} {i}" for k, i in done)
        )
    ran = executed.forks()
    for fid, step in plan.forks().items():
        got = ran.get(fid)
        if got is None:
            out.append(f"fork {fid} was planned and not made")
            continue
        if got.query.strip() != step.query.strip():
            out.append(f"fork {fid}: planned {step.query.strip()[:80]!r}, asked {got.query.strip()[:80]!r}")
        if (got.endpoint or None) != (step.endpoint or None):
            out.append(f"fork {fid}: planned for {step.endpoint or 'model'}, ran on {got.endpoint or 'model'}")
    out += [f"fork {fid} was not in the plan" for fid in ran if fid not in plan.forks()]
    return out
