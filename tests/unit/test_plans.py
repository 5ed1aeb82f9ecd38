"""Fork/join plans: read from an organizer's text, checked, shown to the organizer, diffed, compared."""

from __future__ import annotations

from shared.plans import Plan, PlanStep, check_plan, deviations, plan_diff, plan_from_text, plan_prompt

TEXT = "Let me split it. <FORK-1>25+50</FORK-1><FORK-2@python>3*25</FORK-2> wait <JOIN-1>r1</JOIN-1><JOIN-2>r2</JOIN-2><ANSWER>x</ANSWER>"


def fork(i: int, q: str, ep: str | None = None, budget: int | None = None) -> PlanStep:
    return PlanStep(kind="fork", fork_id=i, query=q, endpoint=ep, budget=budget)


def join(i: int) -> PlanStep:
    return PlanStep(kind="join", fork_id=i)


def test_a_plan_from_an_organizers_text() -> None:
    assert plan_from_text(TEXT) == Plan(steps=(fork(1, "25+50"), fork(2, "3*25", "python"), join(1), join(2)))
    assert plan_from_text("no forks at all <ANSWER>1</ANSWER>") == Plan()


def test_check_plan_names_every_problem() -> None:
    ok = Plan(steps=(fork(1, "a"), join(1), fork(2, "b", "human:experts"), join(2)))
    assert check_plan(ok, capacity=2, endpoints=[None, "human:experts"]) == []
    bad = Plan(steps=(fork(1, "a"), fork(1, ""), fork(4, "d"), join(3), join(1), join(1), fork(2, "b", "nowhere")))
    problems = check_plan(bad, capacity=2, endpoints=[None, "python"])
    assert any("used twice" in p for p in problems) and any("empty" in p for p in problems)
    assert any("not forked before" in p for p in problems) and any("already joined" in p for p in problems)
    assert any("no worker endpoint 'nowhere'" in p for p in problems) and any("capacity 2 allows 1" in p for p in problems)


def test_the_prompt_has_no_protocol_tags() -> None:
    text = plan_prompt(Plan(steps=(fork(1, "25+50", budget=64), fork(2, "3*25", "python"), join(1), join(2))))
    assert text.splitlines() == [
        "Approved plan (fork/join skeleton):", "- fork 1 → model: 25+50 (budget 64)", "- fork 2 → python: 3*25",
        "- join 1", "- join 2",
    ]
    assert "<" not in text


def test_the_diff() -> None:
    before = plan_from_text(TEXT)
    after = Plan(steps=(fork(2, "3*25", "python"), fork(1, "what is 25+50?"), join(2), join(1), fork(3, "check")))
    ops = [(line.op, line.text) for line in plan_diff(before, after)]
    assert ("changed", "fork 1 → model: what is 25+50?") in ops and ("added", "fork 3 → model: check") in ops
    assert {op for op, _ in ops} >= {"changed", "added"}
    assert any(line.moved or line.op == "moved" for line in plan_diff(before, after))
    assert [line.op for line in plan_diff(before, before)] == ["same"] * 4
    removed = plan_diff(before, Plan(steps=before.steps[:1]))
    assert [line.op for line in removed] == ["same", "removed", "removed", "removed"]


def test_deviations() -> None:
    plan = Plan(steps=(fork(1, "a"), fork(2, "b", "python"), join(1), join(2)))
    assert deviations(plan, plan) == []
    ran = Plan(steps=(fork(1, "a!"), join(1), fork(3, "c")))
    out = deviations(plan, ran)
    assert any(d.startswith("order:") for d in out) and "fork 2 was planned and not made" in out
    assert any("fork 1: planned 'a', asked 'a!'" in d for d in out) and "fork 3 was not in the plan" in out
