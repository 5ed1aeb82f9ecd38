"""The search teacher: every written step checkable from what is above it, every answer verified.

The traces are re-read here with an independent checker (a small state machine over the lines, exact
arithmetic with ``fractions``), not with the teacher's own code, and every teacher answer is replayed
through the task's verifier.
"""

from __future__ import annotations

import random
import re
from fractions import Fraction

import pytest

from shared.protocol import Answer, Fork, Join, Return, Role, parse
from shared.tasks.base import Mode, Problem
from shared.tasks.countdown import CountdownTask
from shared.tasks.expr import canonical, check_solution, evaluate, leaves
from shared.tools import verified, verify_query
from trainer.synth.dataset import synthesize
from trainer.synth.search_teacher import SearchTeacher, needs, pairs_in_order, search_unit, steps_of

TASK = CountdownTask()
_STEP = re.compile(r"^(\d+)([-+*/])(\d+)=(\d+)$")


def _apply(op: str, x: int, y: int) -> Fraction:
    return {"+": Fraction(x + y), "-": Fraction(x - y), "*": Fraction(x * y), "/": Fraction(x, y)}[op]


def _step(text: str) -> tuple[int, str, int, int]:
    m = _STEP.match(text)
    assert m, f"not one operation with its result: {text!r}"
    x, op, y, z = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
    assert _apply(op, x, y) == z, f"wrong arithmetic: {text!r}"
    return x, op, y, z


def read_needs(lines: list[str], numbers: list[int], target: int) -> dict[int, set[int]]:
    """The ``need n: ...`` lines: each entry one checked operation on the target and n."""
    need: dict[int, set[int]] = {}
    for line in lines:
        n = int(line[5 : line.index(":")])
        assert line.startswith("need ") and n in numbers
        values = set()
        for part in line.split(": ", 1)[1].split():
            x, op, y, z = _step(part)
            assert target in (x, y) and n in (x, y)  # built from the target and n only
            values.add(z)
        need[n] = values
    return need


def check_unit(lines: list[str], pair: tuple[int, int], rest: list[int], target: int,
               needs: dict[int, set[int]] | None = None) -> list[str]:
    """Re-read one unit: every line is one checked operation on values already on the page (``needs``:
    need lines written earlier); hits end on the target, use exactly the numbers on their path, and
    are written as an expression of them. Returns the hit expressions."""
    a, b = max(pair), min(pair)
    need: dict[int, set[int]] = dict(needs or {})
    value: int | None = None  # the current first step's value
    first_ops: set[str] = set()
    hits: list[str] = []
    for line in lines:
        if line.startswith("need "):
            need.update(read_needs([line], rest, target))
            continue
        steps, _, expr = line.partition(" hit ")
        parts = steps.split()
        x, op, y, v = _step(parts[0])
        if (x, y) == (a, b) and op not in first_ops:  # a first step: the pair, each operation once
            first_ops.add(op)
            value = v
            used = [a, b]
        else:
            assert value is not None, f"a second step before any first step: {line!r}"
            assert value in (x, y), f"a second step not on the running value {value}: {line!r}"
            other = y if x == value else x
            assert other in rest
            used = [a, b, other]
            if len(parts) == 2:  # the last step: the value must be a need of the number left over
                left_over = list(rest)
                left_over.remove(other)
                lx, _, ly, lz = _step(parts[1])
                assert lz == target and v in (lx, ly) and left_over[0] in (lx, ly)
                assert v in need[left_over[0]], f"{v} is not a written need of {left_over[0]}: {line!r}"
                used.append(left_over[0])
        if expr:
            assert len(parts) == 2 or v == target
            assert evaluate_text(expr) == target
            assert sorted(leaves_of(expr)) == sorted(used), (line, used)
            hits.append(expr)
        else:
            assert len(parts) == 1 and v != target
    return hits


def evaluate_text(expr: str) -> Fraction:
    from shared.tasks.expr import parse as parse_expr

    return evaluate(parse_expr(expr))


def leaves_of(expr: str) -> list[int]:
    from shared.tasks.expr import parse as parse_expr

    return leaves(parse_expr(expr))


@pytest.fixture(scope="module")
def problems() -> list[Problem]:
    return TASK.problems("test", 150)


# ------------------------------------------------------------------------------------------ the search
def test_steps_and_needs_follow_the_rules() -> None:
    assert steps_of(3, 25) == [("+", 25, 3, 28), ("-", 25, 3, 22), ("*", 25, 3, 75)]
    assert steps_of(18, 18) == [("+", 18, 18, 36), ("/", 18, 18, 1)]  # x-x is padding; x/x a 1 of its own
    assert [s[0] for s in steps_of(41, 14)] == ["+", "-"]  # two numbers >= 10 are never multiplied
    assert [s[0] for s in steps_of(7, 1)] == ["+", "-"]  # x*1 and x/1 are padding
    assert needs(4, 13) == [("13-4=9", 9), ("13+4=17", 17), ("13*4=52", 52)]
    assert needs(80, 81) == [("81-80=1", 1), ("81+80=161", 161), ("81*80=6480", 6480)]
    assert needs(26, 13) == [("13+26=39", 39), ("26-13=13", 13), ("13*26=338", 338), ("26/13=2", 2)]


def test_a_unit_is_written_line_by_line() -> None:
    unit = search_unit([41, 14, 4, 3], 13, (14, 41))
    assert unit.query == "41 14 | 4 3 -> 13"
    assert unit.worker_lines[:4] == ("need 4: 13-4=9 13+4=17 13*4=52", "need 3: 13-3=10 13+3=16 13*3=39",
                                     "41+14=55", "55+4=59")
    assert "55-3=52 52/4=13 hit (41+14-3)/4" in unit.steps
    assert "27/3=9 9+4=13 hit (41-14)/3+4" in unit.steps
    assert unit.returned == "(41+14-3)/4; (41-14)/3+4"
    assert check_unit(list(unit.worker_lines), (41, 14), [4, 3], 13) == ["(41+14-3)/4", "(41-14)/3+4"]
    assert unit.organizer_text().startswith("pair 41 14\n41+14=55\n")  # the organizer wrote its needs on top


def test_a_one_made_of_numbers_is_tried_both_ways_up() -> None:
    numbers = [80, 18, 86, 68]
    hits = {canonical(h.expr) for pair in pairs_in_order(numbers) for h in search_unit(numbers, 81, pair).hits}
    assert canonical("80+18/(86-68)") in hits and canonical("80+(86-68)/18") in hits  # two solutions
    assert canonical("80+18/(86-68)") != canonical("80+(86-68)/18")


def test_every_line_of_every_unit_is_checkable(problems: list[Problem]) -> None:
    for p in problems:
        numbers, target = p.payload["numbers"], p.payload["target"]
        for pair in pairs_in_order(numbers):
            unit = search_unit(numbers, target, pair)
            hits = check_unit(list(unit.worker_lines), unit.pair, list(unit.rest), target)
            assert hits == [h.expr for h in unit.hits]


# ------------------------------------------------------------------------------------------ traces
def test_every_teacher_answer_replays_valid_and_distinct(problems: list[Problem]) -> None:
    """The issue's check (a): every answer of every kept trace, through the task's verifier."""
    teacher = SearchTeacher(TASK)
    result = synthesize(teacher, problems, sequential=True, seed=3)
    assert result.kept["asyncthink"] == result.kept["sequential"] >= 0.95 * len(problems)
    assert set(result.dropped) <= {"too_few_solutions"}
    index = {p.id: p for p in problems}
    answers = 0
    for rec in result.records:
        if rec.kind == "worker":
            continue
        events, errors = parse(rec.completion, Role.ORGANIZER, capacity=2 if rec.kind == "organizer" else 1,
                               allow_fork=rec.kind == "organizer")
        assert errors == []
        answer = next(e for e in events if isinstance(e, Answer)).text
        score = TASK.score(index[rec.problem_id], answer)
        assert score.correct >= 1 and not score.details["invalid"] and not score.details["duplicate"]
        assert score.correct == min(4, len(answer.split("; ")))
        answers += 1
    assert answers == 2 * result.kept["asyncthink"]
    assert 0 < result.partial["asyncthink"] == result.partial["sequential"] < 0.35 * len(problems)


def test_asyncthink_episodes_fork_units_and_verify_every_candidate(problems: list[Problem]) -> None:
    teacher = SearchTeacher(TASK)
    result = synthesize(teacher, problems[:60], seed=5)
    by_episode: dict[str, list] = {}
    for r in result.records:
        by_episode.setdefault(r.episode_id, []).append(r)
    index = {p.id: p for p in problems}
    own_units = 0
    for recs in by_episode.values():
        org = next(r for r in recs if r.kind == "organizer")
        problem = index[org.problem_id]
        numbers, target = problem.payload["numbers"], problem.payload["target"]
        assert org.prompt == TASK.organizer_prompt(problem, Mode.ASYNCTHINK)
        events, errors = parse(org.completion, Role.ORGANIZER, capacity=2)
        assert errors == []
        forks = [e for e in events if isinstance(e, Fork)]
        workers = {r.fork_id: r for r in recs if r.kind == "worker"}
        assert {f.fork_id for f in forks if f.endpoint is None} == set(workers) != set()
        verifies = [f for f in forks if f.endpoint == "verify"]
        assert verifies and all(f.endpoint in (None, "verify") for f in forks)
        candidates: list[str] = []
        for f in forks:
            if f.endpoint is None:  # a model worker: a unit, read back line by line
                a, b = map(int, f.query.split(" | ")[0].split())
                rest = [int(x) for x in f.query.split(" | ")[1].split(" -> ")[0].split()]
                wevents, werrors = parse(workers[f.fork_id].completion, Role.WORKER, allow_fork=False)
                assert werrors == []
                body = workers[f.fork_id].completion.split("<RETURN>")[0].strip().split("\n")
                hits = check_unit(body, (a, b), rest, target)
                ret = next(e for e in wevents if isinstance(e, Return)).text
                assert ret == ("; ".join(hits) or "none")
        own = re.sub(r"<FORK-\d+(@verify)?>.*?</FORK-\d+>|<JOIN-(\d+)>.*?</JOIN-\2>|<ANSWER>.*", "\n",
                     org.completion, flags=re.S)
        lines = [line for line in own.split("\n") if line and not line.startswith("have ")]
        top = [line for line in lines if line.startswith("need ")]
        assert lines[: len(top)] == top  # the needs come before the organizer's own first unit
        if top:
            assert len(top) == len(set(numbers))
        own_needs = read_needs(top, numbers, target)
        for block in "\n".join(lines[len(top):]).split("pair ")[1:]:
            head, *body = block.strip().split("\n")
            a, b = map(int, head.split())
            rest = list(numbers)
            rest.remove(a)
            rest.remove(b)
            check_unit(body, (a, b), rest, target, needs=own_needs)
            own_units += 1
        last_reply = ""
        joins = {e.fork_id: e for e in events if isinstance(e, Join)}
        for f in verifies:  # the tool's reply is exactly what the runtime injects after its join
            reply, error = verify_query(f.query)
            start = joins[f.fork_id].offset + len(f"<JOIN-{f.fork_id}>")
            assert error is None and org.completion[start:].startswith(reply + f"</JOIN-{f.fork_id}>")
            listed = f.query.split(": ", 1)[1].split("; ")
            candidates.extend(listed)
            last_reply = reply
        answer = next(e for e in events if isinstance(e, Answer)).text
        assert answer.split("; ") == verified(last_reply)[:4]  # the answer is the verified list
        for expr in answer.split("; "):
            check_solution(expr, numbers, target)
    assert own_units > 30


def test_sequential_traces_rederive_every_candidate(problems: list[Problem]) -> None:
    teacher = SearchTeacher(TASK)
    result = synthesize(teacher, problems[:60], asyncthink=False, sequential=True, seed=1)
    index = {p.id: p for p in problems}
    for rec in result.records:
        problem = index[rec.problem_id]
        numbers, target = problem.payload["numbers"], problem.payload["target"]
        assert rec.prompt == TASK.organizer_prompt(problem, Mode.SEQUENTIAL) and "<FORK" not in rec.completion
        body = rec.completion.split("<ANSWER>")[0].strip().split("\n")
        top = [line for line in body if line.startswith("need ")]
        assert body[: len(top)] == top and len(top) == len(set(numbers))
        needs_on_top = read_needs(top, numbers, target)
        kept: list[str] = []
        unit: list[str] = []
        pair: tuple[int, int] | None = None
        for line in body[len(top):] + ["pair 0 0"]:
            if line.startswith(("pair ", "check ", "have ")) and unit and pair is not None:
                rest = list(numbers)
                rest.remove(pair[0])
                rest.remove(pair[1])
                check_unit(unit, pair, rest, target, needs=needs_on_top)
                unit = []
            if line.startswith("pair "):
                pair = tuple(map(int, line.split()[1:]))  # type: ignore[assignment]
            elif line.startswith("check "):
                expr, _, judged = line[6:].partition(": ")
                derivation, same, earlier = judged.partition(" same as ")
                *steps, verdict = derivation.split() if not same else [*derivation.split(), "same"]
                values = [_step(step)[3] for step in steps]
                assert values[-1] == target == evaluate_text(expr)  # re-derived from the text of the candidate
                assert verdict in ("ok", "padding", "same")
                if same:
                    assert earlier in kept and canonical(earlier) == canonical(expr)
                if verdict == "ok":
                    kept.append(expr)
                    check_solution(expr, numbers, target)
            elif line.startswith("have "):
                assert int(line[5:]) == len(kept)
            elif line != "pair 0 0":
                unit.append(line)
        answer = rec.completion.split("<ANSWER>")[1].removesuffix("</ANSWER>")
        assert answer.split("; ") == kept[:4]


def test_a_trace_is_rejected_when_its_verify_reply_is_not_the_tools(problems: list[Problem]) -> None:
    from trainer.synth.records import check_episode

    teacher = SearchTeacher(TASK)
    ep = teacher.episode(problems[0], random.Random(0))
    assert ep is not None and check_episode(TASK, ep, 2, partial=True) is None
    text = ep.organizer.completion
    i = text.index("<JOIN-", text.index("@verify>"))
    start = text.index(">", i) + 1
    ep.organizer.completion = text[:start] + "ok 1+1; " + text[start + 8 :]
    assert check_episode(TASK, ep, 2, partial=True) == "join_mismatch"
