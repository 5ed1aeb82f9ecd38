"""Countdown traces a small model can execute: the search written as it happens, every step checkable.

The old teacher (:mod:`trainer.synth.teacher`) wrote only a solver's successful paths (``41+14=55:
55-3=52 52/4=13``): from a state the model had to leap to a path that works, and it learned to invent
the arithmetic. Here every line follows from what is written above it, one operation with its result,
failed lines included, and nothing enters the answer before it is checked.

**The search.** Units are first pairs, in order of position: unit ``(a, b)`` (``a >= b``) holds the
candidates whose first step combines ``a`` and ``b``; the other two numbers ``c, d`` are the rest. A
worker forked on a unit writes (the organizer and a sequential trace write the same steps, after
``pair a b``, with every ``need`` line written once before their first unit)::

    need 4: 13-4=9 13+4=17 13*4=52        what x must be so that x with 4 makes the target 13
    need 3: 13-3=10 13+3=16 13*3=39
    41+14=55                              a first step (+, -, *, / of the pair: whole, positive, no padding)
    55+4=59                               a second step: the running value with one of the rest
    55-3=52 52/4=13 hit (41+14-3)/4       52 is a need of the last number 4: the last step, then the candidate
    41-14=27
    27/3=9 9+4=13 hit (41-14)/3+4
    ...

Each ``need n`` line holds the values x with ``x+n``, ``x-n``, ``n-x``, ``x*n``, ``x/n`` or ``n/x`` equal to
the target (each as the operation that computes it), so a second step either matches a need of the
number left over (then the last step is written with its result and the candidate after ``hit``) or
is a miss, with nothing to compute. A step that reaches the target by itself is a hit too. Pruned, by
rules a model can check: results must be whole and positive; ``x*1``, ``x/1``, ``x-x`` are padding and
never tried (``x/x`` is: a 1 built from numbers and then added, as in ``80+18/(86-68)``, is a solution
of its own); two numbers that are both ``>= 10`` are never multiplied (hard products, rarely useful
below a target of 100).

**AsyncThink form.** The organizer follows a sampled skeleton (:mod:`trainer.synth.structure`): it forks
some units to workers (query ``a b | c d -> t``; a worker writes the unit and returns its candidates,
``none`` if it has none) and writes the others itself after ``pair a b`` (its need lines for every
number go just before its first own unit, so a worker forked first runs meanwhile). After every join
that brings candidates it forks the
candidates it has not checked yet to the ``verify`` tool (:mod:`shared.tools`), listing the solutions
it already holds first, so the tool's ``ok`` entries are exactly its verified, distinct solutions::

    <FORK-2@verify>41 14 4 3 -> 13: (41+14-3)/4; (41-14)/3+4</FORK-2><JOIN-2>ok (41+14-3)/4; ok (41-14)/3+4</JOIN-2>
    have 2

It answers with the first ``n_s`` of them. **Sequential form**: the need lines, then the same unit
lines in one stream (``pair a b`` before each); after each unit that hit the target every new
candidate is re-derived step by step from its own text and judged: ``check (41+14-3)/4: 41+14=55
55-3=52 52/4=13 ok`` (or ``same as <earlier>``, or ``padding`` when it only pads a bare number), then
``have N``. Both forms use the same units in the same order and stop after the unit that brings the
verified count to ``n_s``.

Limits: the search covers chains ``((a op b) op y) op z`` and shorter, over whole positive values; the
"two pairs" shape ``(a op b) op (c op d)`` and fractional intermediates are not searched, so on some
problems every unit together holds fewer than ``n_s`` solutions: the trace then tries every pair and
answers with what it verified (``partial``); problems where it finds none are dropped (counted as
``too_few_solutions``). Numbers given twice make one pair unit per distinct value pair.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from itertools import combinations

from shared.tasks.base import Problem
from shared.tasks.expr import BinOp, Canonical, Expr, ExprError, Num, check_solution, evaluate, to_text
from shared.tools import MAX_EXPRESSIONS, verified, verify_query
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
from trainer.synth.structure import Skeleton, SkeletonTeacher, StepKind

VERIFY = "verify"  # the tool endpoint the organizer checks its candidates with


def steps_of(a: int, b: int) -> list[tuple[str, int, int, int]]:
    """The steps tried on two values: ``(op, left, right, result)``, larger first, whole and positive,
    no padding (``x*1``, ``x/1``, ``x-x``) and no product of two numbers that are both >= 10. ``x/x``
    is tried: a 1 made of numbers and then added is a solution of its own (``80+18/(86-68)``)."""
    hi, lo = max(a, b), min(a, b)
    out = [("+", hi, lo, hi + lo)]
    if hi != lo:
        out.append(("-", hi, lo, hi - lo))
    if lo != 1 and lo < 10:
        out.append(("*", hi, lo, hi * lo))
    if lo != 1 and hi % lo == 0:  # x/x = 1 is allowed: an added 1 built from numbers is not padding
        out.append(("/", hi, lo, hi // lo))
    return out


def needs(n: int, target: int) -> list[tuple[str, int]]:
    """``(last step, x)`` for every whole positive x that makes ``target`` with ``n`` in one step:
    ``x+n``, ``x-n``, ``n-x``, ``x*n``, ``x/n``, ``n/x`` (the step written with x in place)."""
    out: list[tuple[str, int]] = []
    if target - n > 0:
        out.append((f"{target}-{n}={target - n}", target - n))  # x + n = t
    out.append((f"{target}+{n}={target + n}", target + n))  # x - n = t
    if n > target:
        out.append((f"{n}-{target}={n - target}", n - target))  # n - x = t
    if n != 1:
        if target % n == 0 and n != target:
            out.append((f"{target}/{n}={target // n}", target // n))  # x * n = t
        out.append((f"{target}*{n}={target * n}", target * n))  # x / n = t
    if n % target == 0 and n != target:
        out.append((f"{n}/{target}={n // target}", n // target))  # n / x = t
    return out


def last_step(x: int, n: int, target: int) -> str | None:
    """The op of the last step that makes ``target`` from ``x`` and ``n`` (``x`` first: "+", "-", "*",
    "/"; ``n`` first: "r-", "r/"), None when there is none. The order matches :func:`needs`."""
    if x + n == target:
        return "+"
    if x - n == target:
        return "-"
    if n - x == target:
        return "r-"
    if n != 1 and x != 1 and x * n == target:
        return "*"
    if n != 1 and x == target * n:
        return "/"
    if x != 1 and n == target * x:
        return "r/"
    return None


@dataclass(frozen=True)
class Hit:
    """A candidate a unit found: its expression and its tree."""

    expr: str
    tree: Expr


def need_line(n: int, target: int) -> str:
    return f"need {n}: " + " ".join(text for text, _ in needs(n, target))


def need_lines(numbers: list[int], target: int) -> list[str]:
    """One ``need`` line per distinct number (what the last step with it needs)."""
    return [need_line(n, target) for n in _distinct(numbers)]


@dataclass(frozen=True)
class Unit:
    """One first-pair unit of the search: every first step on the pair, each followed by its second steps."""

    pair: tuple[int, int]  # (a, b) with a >= b
    rest: tuple[int, ...]  # the other numbers, in problem order
    target: int
    steps: tuple[str, ...]  # per first step: its line, then one line per second step
    hits: tuple[Hit, ...]

    @property
    def query(self) -> str:
        return f"{self.pair[0]} {self.pair[1]} | {' '.join(map(str, self.rest))} -> {self.target}"

    @property
    def returned(self) -> str:
        return "; ".join(h.expr for h in self.hits) or "none"

    @property
    def worker_lines(self) -> tuple[str, ...]:
        """A worker writes the needs of its own rest numbers first: it sees nothing but its query."""
        return (*need_lines(list(self.rest), self.target), *self.steps) if len(self.rest) == 2 else self.steps

    def worker_text(self) -> str:
        return "\n".join(self.worker_lines) + f"\n<RETURN>{self.returned}</RETURN>"

    def organizer_text(self) -> str:
        """The organizer (or a sequential trace) wrote every need line at the top: the pair, then the steps."""
        return f"pair {self.pair[0]} {self.pair[1]}\n" + "\n".join(self.steps) + "\n"


def search_unit(numbers: list[int], target: int, pair: tuple[int, int]) -> Unit:
    """Write the unit of ``pair`` (two of ``numbers``): each first step, then every second step on its
    value with one of the rest, finished by a last step where the value is a need of the number left."""
    a, b = max(pair), min(pair)
    rest = list(numbers)
    rest.remove(a)
    rest.remove(b)
    lines: list[str] = []
    hits: list[Hit] = []
    for first in steps_of(a, b):
        more_lines, more_hits = _after_first(first, rest, target)
        lines += more_lines
        hits += more_hits
    return Unit((a, b), tuple(rest), target, tuple(lines), tuple(hits))


def _after_first(first: tuple[str, int, int, int], rest: list[int], target: int) -> tuple[list[str], list[Hit]]:
    """The lines of one first step and of every second step after it, and the candidates they hit."""
    op, x, y, v = first
    tree = BinOp(op, Num(x), Num(y))
    if v == target:
        hit = Hit(to_text(tree), tree)
        return [f"{x}{op}{y}={v} hit {hit.expr}"], [hit]  # going on from a hit would only pad it
    lines = [f"{x}{op}{y}={v}"]
    hits: list[Hit] = []
    if len(rest) > 2:
        return lines, hits  # the search goes two steps deep after the first
    for k, other in enumerate(rest):
        last = rest[1 - k] if len(rest) == 2 else None
        for op2, x2, y2, w in steps_of(v, other):
            left, right = (tree, Num(y2)) if x2 == v else (Num(x2), tree)
            seconds = [BinOp(op2, left, right)]
            if x2 == y2 and op2 == "/":  # v/n and n/v are both 1, and two different solutions
                seconds.append(BinOp(op2, right, left))
            line = f"{x2}{op2}{y2}={w}"
            if w == target:
                for second in seconds:
                    hits.append(Hit(to_text(second), second))
                    lines.append(f"{line} hit {to_text(second)}")
                continue
            how = None if last is None else last_step(w, last, target)
            if how is None or last is None:
                lines.append(line)
                continue
            for second in seconds:
                if how.startswith("r"):
                    final: Expr = BinOp(how[1], Num(last), second)
                    step = f"{last}{how[1]}{w}={target}"
                else:
                    final = BinOp(how, second, Num(last))
                    step = f"{w}{how}{last}={target}"
                hits.append(Hit(to_text(final), final))
                lines.append(f"{line} {step} hit {to_text(final)}")
    return lines, hits


def _distinct(values: list[int]) -> list[int]:
    out: list[int] = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def pairs_in_order(numbers: list[int]) -> list[tuple[int, int]]:
    """Distinct pairs (as value multisets, larger first) in order of position."""
    out: list[tuple[int, int]] = []
    for i, j in combinations(range(len(numbers)), 2):
        p = (max(numbers[i], numbers[j]), min(numbers[i], numbers[j]))
        if p not in out:
            out.append(p)
    return out


def rederive(tree: Expr) -> str:
    """The post-order steps of an expression, ``x op y=z`` each (exact values)."""
    out: list[str] = []

    def walk(node: Expr) -> str:
        if isinstance(node, Num):
            return str(node.value)
        left, right = walk(node.left), walk(node.right)
        value = evaluate(node)
        text = str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
        out.append(f"{left}{node.op}{right}={text}")
        return text

    walk(tree)
    return " ".join(out)


class Ledger:
    """The verified, distinct solutions held so far (what the verify tool's ``ok`` list says)."""

    def __init__(self, numbers: list[int], target: int) -> None:
        self.numbers, self.target = numbers, target
        self.kept: dict[Canonical, str] = {}

    def judge(self, expr: str) -> str:
        """``ok`` (now kept), ``same as X`` or ``padding``/the verifier's reason; the sequential check."""
        try:
            key = check_solution(expr, self.numbers, self.target)
        except ExprError as exc:
            return "padding" if "padding" in str(exc) else f"no: {exc}"
        if key in self.kept:
            return f"same as {self.kept[key]}"
        self.kept[key] = expr
        return "ok"

    def verify(self, candidates: list[str]) -> tuple[str, str]:
        """The verify tool's query (held solutions first, then ``candidates``) and its reply; the ledger
        then holds exactly the reply's ``ok`` entries."""
        listed = list(self.kept.values()) + candidates
        query = f"{' '.join(map(str, self.numbers))} -> {self.target}: {'; '.join(listed)}"
        reply, error = verify_query(query)
        if error:  # pragma: no cover - the teacher's own queries are well formed
            raise ValueError(f"verify refused the teacher's query {query!r}: {reply}")
        self.kept = {check_solution(e, self.numbers, self.target): e for e in verified(reply)}
        return query, reply


@dataclass
class SearchTeacher(SkeletonTeacher):
    """Writes search traces (AsyncThink episodes and sequential traces) for countdown problems."""

    exhaust: bool = True  # keep problems the units cannot fill: every unit, answer with fewer than n_s
    stats: dict[str, int] = field(default_factory=dict)  # hits written, hits that were no new solution

    def units(self, problem: Problem) -> list[Unit] | None:
        """The units needed, in order, to reach ``n_s`` distinct solutions; every unit when they never do
        (with ``exhaust`` and at least one solution); None otherwise."""
        p = problem.payload
        numbers, target, need = list(p["numbers"]), int(p["target"]), int(p["n_solutions"])
        ledger = Ledger(numbers, target)
        out: list[Unit] = []
        for pair in pairs_in_order(numbers):
            unit = search_unit(numbers, target, pair)
            out.append(unit)
            for hit in unit.hits:
                ledger.judge(hit.expr)
            if len(ledger.kept) >= need:
                return out
        return out if self.exhaust and ledger.kept else None

    def _count(self, kind: str, n: int = 1) -> None:
        self.stats[kind] = self.stats.get(kind, 0) + n

    # ----------------------------------------------------------------------------- writing
    def write_episode(self, problem: Problem, units: list[Unit], skeleton: Skeleton, episode_id: str) -> Episode:
        p = problem.payload
        need = int(p["n_solutions"])
        ledger = Ledger(list(p["numbers"]), int(p["target"]))
        w = OrganizerWriter()
        workers: dict[int, TraceRecord] = {}
        unit_of_fork: dict[int, Unit] = {}
        ids: dict[int, int] = {}  # skeleton fork id -> fork id in the text (verify forks take ids too)
        pending: list[str] = []  # candidates not verified yet
        next_id = 1
        needs_written = len(p["numbers"]) != 4  # written just before the organizer's first own unit

        def check() -> None:
            nonlocal next_id
            while pending:  # a query holds at most MAX_EXPRESSIONS: the kept ones, then new ones
                room = max(1, MAX_EXPRESSIONS - len(ledger.kept))
                batch, pending[:] = pending[:room], pending[room:]
                query, reply = ledger.verify(batch)
                w.fork(next_id, query, endpoint=VERIFY)
                w.join(next_id, reply)
                w.think("\n")
                next_id += 1
                w.think(f"have {len(ledger.kept)}\n")

        for step in skeleton.steps:
            if step.kind is StepKind.FORK:
                assert step.fork_id is not None and step.unit is not None
                unit = units[step.unit]
                ids[step.fork_id] = next_id
                unit_of_fork[next_id] = unit
                w.fork(next_id, unit.query)
                w.think("\n")
                workers[next_id] = worker_record(
                    self.task, problem, episode_id=episode_id, fork_id=next_id, query=unit.query,
                    completion=unit.worker_text(), capacity=skeleton.capacity, topology=skeleton.topology,
                )
                next_id += 1
            elif step.kind is StepKind.JOIN:
                assert step.fork_id is not None
                fid = ids[step.fork_id]
                unit = unit_of_fork[fid]
                w.join(fid, unit.returned)
                w.think("\n")
                pending.extend(h.expr for h in unit.hits)
                check()
            else:
                assert step.unit is not None
                unit = units[step.unit]
                if not needs_written:
                    w.think("\n".join(need_lines(list(p["numbers"]), int(p["target"]))) + "\n")
                    needs_written = True
                w.think(unit.organizer_text())
                pending.extend(h.expr for h in unit.hits)
        if pending:
            check()
        w.answer("; ".join(list(ledger.kept.values())[:need]))
        organizer = organizer_record(
            self.task, problem, w, episode_id=episode_id, capacity=skeleton.capacity, topology=skeleton.topology
        )
        return Episode(problem, organizer, workers)

    def write_sequential(self, problem: Problem, units: list[Unit]) -> TraceRecord:
        p = problem.payload
        need = int(p["n_solutions"])
        ledger = Ledger(list(p["numbers"]), int(p["target"]))
        parts: list[str] = []
        if len(p["numbers"]) == 4:
            parts.append("\n".join(need_lines(list(p["numbers"]), int(p["target"]))) + "\n")
        for unit in units:
            parts.append(unit.organizer_text())
            for hit in unit.hits:
                verdict = ledger.judge(hit.expr)
                self._count("hits")
                self._count("hits_not_new", verdict != "ok")
                parts.append(f"check {hit.expr}: {rederive(hit.tree)} {verdict}\n")
            if unit.hits:
                parts.append(f"have {len(ledger.kept)}\n")
        parts.append(f"<ANSWER>{'; '.join(list(ledger.kept.values())[:need])}</ANSWER>")
        return sequential_record(self.task, problem, "".join(parts))

    # ----------------------------------------------------------------------------- checked output
    def _complete(self, problem: Problem, units: list[Unit]) -> bool:
        ledger = Ledger(list(problem.payload["numbers"]), int(problem.payload["target"]))
        for unit in units:
            for hit in unit.hits:
                ledger.judge(hit.expr)
        return len(ledger.kept) >= int(problem.payload["n_solutions"])

    def episode(self, problem: Problem, rng: random.Random) -> Episode | None:
        """A checked AsyncThink episode, or None (the reason is counted in ``dropped``)."""
        units = self.units(problem)
        if units is None:
            self.dropped["too_few_solutions"] += 1
            return None
        skeleton = self.skeleton(rng, len(units))
        ep = self.write_episode(problem, units, skeleton, f"{problem.id}-at")
        complete = self._complete(problem, units)
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
        complete = self._complete(problem, units)
        reason = check_sequential(self.task, problem, rec, partial=not complete)
        if reason:
            self.dropped[reason] += 1
            return None
        self.partial["sequential"] += not complete
        return rec
