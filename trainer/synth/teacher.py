"""The first programmatic countdown teacher ("paths" traces): AsyncThink and sequential traces from a solver.

Superseded by :mod:`trainer.synth.search_teacher` (``asyncthink synth --format search``, the default),
whose traces show the search step by step and verify every candidate; this one is kept so that the two
can be compared (``bench/trace_check.py``) and the shipped models' data can be rebuilt
(``asyncthink synth --format paths``).

The search is split by **first pair**: unit ``(a, b)`` holds the solutions whose first step combines
``a`` and ``b`` (``a+b``, ``a-b``, ``a*b``, ``a/b`` with ``a >= b``; only results that are whole and
positive, and never ``×1``/``÷1``, which are padding). Each state ``a op b = v`` is solved exactly with
:func:`shared.tasks.countdown_solver.solve` on ``v`` and the remaining numbers; the solutions that use
``v`` are written as one line of explicit steps each. (The shipped models' data also noted a target
that is one of the numbers as ``given`` and counted it as a solution; under the task's rules a bare
number is no solution, so that line is gone.) Units are taken in a fixed order (pairs by
position) until ``n_s`` distinct solutions (the task's rules) are known. When every pair together gives
fewer than ``n_s``, the trace tries every pair and answers with the solutions it found (``exhaust``):
without such traces a model whose search comes up short never sees how an episode ends, keeps forking
past the last pair and fails on format (the first shipped model did, in 87 % of its episodes).

The text is written for a ~8 M-parameter model trained from scratch: short, regular, one step per
arithmetic operation. A worker's sub-query and trace look like::

    prompt:     Worker. 41 14 | 4 3 -> 13\n
    completion: 41+14=55: 55-3=52 52/4=13
                41-14=27: 27/3=9 9+4=13
                41*14=574: no
                <RETURN>(41+14-3)/4; (41-14)/3+4</RETURN>

The organizer follows a sampled skeleton (:mod:`trainer.synth.structure`): it forks some units, does
the others itself between forks and joins (the same lines, then ``found ...``), keeps a running count
``have N`` of distinct solutions after each unit, and answers with ``n_s`` of them. A sequential trace
does every unit itself, in order, with the same lines, so its critical path covers the whole search.

Limits: only solutions whose intermediate results are all whole numbers (negative ones allowed) are written (the
verifier accepts more); at most ``max_hits_per_state`` lines per state and ``max_solutions`` per unit, so
a unit's "no" means "none from this state", and a capped unit is not exhaustive. Problems whose units
together give no solution at all (or fewer than ``n_s`` with ``exhaust`` off) are dropped (counted as
``too_few_solutions``); the partial traces kept are counted in ``partial``.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from itertools import combinations

from shared.tasks.base import Problem
from shared.tasks.countdown_solver import apply_op, solve
from shared.tasks.expr import BinOp, Canonical, Expr, ExprError, Num, check_solution, leaves, parse, to_text
from trainer.synth.records import (
    Episode,
    OrganizerWriter,
    TraceRecord,
    check_episode,
    check_sequential,
    organizer_record,
    sequential_record,
    worker_record,
)
from trainer.synth.structure import Skeleton, SkeletonTeacher, StepKind, sequential_skeleton

OPENER = "split by pair\n"  # the organizer's brief plan before its first action


@dataclass(frozen=True)
class Unit:
    """One first-pair unit of the search, ready to be written by a worker or by the organizer."""

    pair: tuple[int, int]  # (a, b) with a >= b
    query: str  # the sub-query a worker gets
    lines: tuple[str, ...]  # one line per state/solution
    solutions: tuple[tuple[str, Canonical], ...]  # (expression, canonical form), distinct, in order

    @property
    def returned(self) -> str:
        return "; ".join(e for e, _ in self.solutions) or "none"

    def worker_text(self) -> str:
        return "\n".join(self.lines) + f"\n<RETURN>{self.returned}</RETURN>"

    def organizer_text(self) -> str:
        a, b = self.pair
        return f"pair {a} {b}\n" + "\n".join(self.lines) + f"\nfound {self.returned}\n"


def _steps(node: Expr) -> list[str] | None:
    """Post-order ``x op y=z`` steps; None if an intermediate result is not a whole number."""
    out: list[str] = []

    def walk(n: Expr) -> Fraction:
        if isinstance(n, Num):
            return Fraction(n.value)
        left, right = walk(n.left), walk(n.right)
        value = _apply(n.op, left, right)
        if value.denominator != 1:
            raise ExprError("not whole")
        out.append(f"{left}{n.op}{right}={value}")
        return value

    try:
        walk(node)
    except ExprError:
        return None
    return out


def _apply(op: str, a: Fraction, b: Fraction) -> Fraction:
    value = apply_op(op, a, b)
    if value is None:
        raise ExprError("division by zero")
    return value


def _substitutions(node: Expr, value: int, pair: Expr) -> list[Expr]:
    """Every tree with one leaf equal to ``value`` replaced by ``pair`` (one per such leaf)."""
    if isinstance(node, Num):
        return [pair] if node.value == value else []
    out: list[Expr] = [BinOp(node.op, left, node.right) for left in _substitutions(node.left, value, pair)]
    out += [BinOp(node.op, node.left, right) for right in _substitutions(node.right, value, pair)]
    return out


def pair_states(a: int, b: int) -> list[tuple[str, int]]:
    """The first steps tried for a pair (a >= b): ``(text "a op b", value)``, whole positive, no padding."""
    out = [(f"{a}+{b}", a + b)]
    if a != b:
        out.append((f"{a}-{b}", a - b))
    if b != 1:
        out.append((f"{a}*{b}", a * b))
        if a % b == 0 and a != b:
            out.append((f"{a}/{b}", a // b))
    return out


def search_pair(
    numbers: list[int],
    target: int,
    pair: tuple[int, int],
    *,
    max_hits_per_state: int = 3,
    max_solutions: int = 4,
) -> Unit:
    """The unit of solutions whose first step combines ``pair`` (two of ``numbers``)."""
    a, b = max(pair), min(pair)
    rest = list(numbers)
    rest.remove(a)
    rest.remove(b)
    query = f"{a} {b} | {' '.join(map(str, rest))} -> {target}"
    lines: list[str] = []
    found: list[tuple[str, Canonical]] = []
    seen: set[Canonical] = set()
    for text, value in pair_states(a, b):
        head = f"{text}={value}"
        hits: list[tuple[list[str], str]] = []
        if value == target:
            hits.append(([], text))
        candidates: list[tuple[list[str], str]] = []
        pair_tree = parse(text)
        for expr_text in solve([*rest, value], target).values():
            tree = parse(expr_text)
            steps = _steps(tree)
            if steps is None or not _uses(tree, value, rest):
                continue  # a whole-number path that needs this first step
            candidates.extend((steps, to_text(full)) for full in _substitutions(tree, value, pair_tree))
        candidates.sort(key=lambda c: (len(c[0]), c[1]))
        hits.extend(candidates)
        kept = 0
        for steps, full_text in hits:
            if kept >= max_hits_per_state or len(found) >= max_solutions:
                break
            try:
                key = check_solution(full_text, numbers, target)
            except ExprError:
                continue
            if key in seen:
                continue
            seen.add(key)
            found.append((full_text, key))
            lines.append(f"{head}: {' '.join(steps)}" if steps else head)
            kept += 1
        if not kept:
            lines.append(f"{head}: no")
    return Unit((a, b), query, tuple(lines), tuple(found))


def _uses(tree: Expr, value: int, rest: list[int]) -> bool:
    """Whether a solution over ``rest + [value]`` needs ``value`` (its leaves do not fit in ``rest``)."""
    return Counter(leaves(tree))[value] > Counter(rest)[value]


def pairs_in_order(numbers: list[int]) -> list[tuple[int, int]]:
    """Distinct pairs (as value multisets) in order of position."""
    out: list[tuple[int, int]] = []
    for i, j in combinations(range(len(numbers)), 2):
        p = (max(numbers[i], numbers[j]), min(numbers[i], numbers[j]))
        if p not in out:
            out.append(p)
    return out


@dataclass
class CountdownTeacher(SkeletonTeacher):
    """Writes AsyncThink episodes and sequential traces for countdown problems (see module docstring)."""

    max_hits_per_state: int = 3  # solution lines per first step
    max_solutions: int = 4  # per unit
    exhaust: bool = True  # keep problems the pairs cannot fill: try every pair, answer with fewer than n_s

    def units(self, problem: Problem) -> list[Unit] | None:
        """The units needed (in order) to reach ``n_s`` distinct solutions; when they never do, every unit
        (with ``exhaust`` and at least one solution) or None."""
        p = problem.payload
        numbers, target, need = list(p["numbers"]), int(p["target"]), int(p["n_solutions"])
        out: list[Unit] = []
        keys: set[Canonical] = set()
        for pair in pairs_in_order(numbers):
            unit = search_pair(
                numbers,
                target,
                pair,
                max_hits_per_state=self.max_hits_per_state,
                max_solutions=self.max_solutions,
            )
            out.append(unit)
            keys.update(k for _, k in unit.solutions)
            if len(keys) >= need:
                return out
        return out if self.exhaust and keys else None

    def complete(self, problem: Problem, units: list[Unit]) -> bool:
        """Whether ``units`` hold ``n_s`` distinct solutions (False: an exhaustive, partial trace)."""
        keys = {k for u in units for _, k in u.solutions}
        return len(keys) >= int(problem.payload["n_solutions"])

    # ----------------------------------------------------------------------------- writing
    def write_episode(
        self, problem: Problem, units: list[Unit], skeleton: Skeleton, episode_id: str
    ) -> Episode:
        need = int(problem.payload["n_solutions"])
        w = OrganizerWriter()
        have: dict[Canonical, str] = {}
        w.think(OPENER)
        workers: dict[int, TraceRecord] = {}
        unit_of_fork: dict[int, Unit] = {}

        def tally(unit: Unit) -> None:
            for expr, key in unit.solutions:
                have.setdefault(key, expr)
            w.think(f"have {len(have)}\n")

        for step in skeleton.steps:
            if step.kind is StepKind.FORK:
                assert step.fork_id is not None and step.unit is not None
                unit = units[step.unit]
                unit_of_fork[step.fork_id] = unit
                w.fork(step.fork_id, unit.query)
                w.think("\n")
                workers[step.fork_id] = worker_record(
                    self.task, problem, episode_id=episode_id, fork_id=step.fork_id, query=unit.query,
                    completion=unit.worker_text(), capacity=skeleton.capacity, topology=skeleton.topology,
                )
            elif step.kind is StepKind.JOIN:
                assert step.fork_id is not None
                unit = unit_of_fork[step.fork_id]
                w.join(step.fork_id, unit.returned)
                w.think("\n")
                tally(unit)
            else:
                assert step.unit is not None
                w.think(units[step.unit].organizer_text())
                tally(units[step.unit])
        w.answer("; ".join(list(have.values())[:need]))
        organizer = organizer_record(
            self.task, problem, w, episode_id=episode_id, capacity=skeleton.capacity, topology=skeleton.topology
        )
        return Episode(problem, organizer, workers)

    def write_sequential(self, problem: Problem, units: list[Unit]) -> TraceRecord:
        need = int(problem.payload["n_solutions"])
        have: dict[Canonical, str] = {}
        parts: list[str] = []
        for unit in sequential_skeleton(len(units)).steps:
            assert unit.unit is not None
            parts.append(units[unit.unit].organizer_text())
            for expr, key in units[unit.unit].solutions:
                have.setdefault(key, expr)
            parts.append(f"have {len(have)}\n")
        parts.append(f"<ANSWER>{'; '.join(list(have.values())[:need])}</ANSWER>")
        return sequential_record(self.task, problem, "".join(parts))

    # ----------------------------------------------------------------------------- checked output
    def episode(self, problem: Problem, rng: random.Random) -> Episode | None:
        """A checked AsyncThink episode, or None (the reason is counted in ``dropped``)."""
        units = self.units(problem)
        if units is None:
            self.dropped["too_few_solutions"] += 1
            return None
        skeleton = self.skeleton(rng, len(units))
        ep = self.write_episode(problem, units, skeleton, f"{problem.id}-at")
        complete = self.complete(problem, units)
        reason = check_episode(self.task, ep, self.capacity, partial=not complete)
        if reason:
            self.dropped[reason] += 1
            return None
        self.partial["asyncthink"] += not complete
        return ep

    def sequential(self, problem: Problem) -> TraceRecord | None:
        """A checked sequential trace, or None (the reason is counted in ``dropped``)."""
        units = self.units(problem)
        if units is None:
            self.dropped["too_few_solutions"] += 1
            return None
        rec = self.write_sequential(problem, units)
        complete = self.complete(problem, units)
        reason = check_sequential(self.task, problem, rec, partial=not complete)
        if reason:
            self.dropped[reason] += 1
            return None
        self.partial["sequential"] += not complete
        return rec
