"""Countdown: parser, canonical form (the task's rules), solver, generator, test split, scoring, vote."""

from __future__ import annotations

import contextlib
import itertools
import json
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from shared.tasks import get_task
from shared.tasks.base import Mode, Problem, Score
from shared.tasks.countdown import (
    TEST2_FILE,
    TEST_FILE,
    TEST_SIZE,
    CountdownTask,
    countdown_metrics,
    generate,
    held_out_keys,
    load_test2_split,
    load_test_split,
    problem_key,
    split_answer,
)
from shared.tasks.countdown_solver import count_solutions, solution_counts, solutions_starting_with, solve
from shared.tasks.expr import (
    BinOp,
    ExprError,
    Num,
    canonical,
    check_solution,
    distinct_solutions,
    evaluate,
    number_count,
    parse,
    to_text,
)

TASK = CountdownTask()
TRAIN_FILE = Path(__file__).resolve().parents[3] / "trainer" / "data" / "countdown_train_problems.jsonl"


def problem(numbers: list[int], target: int, n_s: int = 4) -> Problem:
    return TASK.problem_from_payload({"numbers": numbers, "target": target, "n_solutions": n_s}, "p")


# ---------------------------------------------------------------- parser


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("6+77", 83),
        ("(6+77)*(2-1)", 83),
        ("50 − 25", 25),
        ("3 × 25", 75),
        ("3x25", 75),
        ("100 ÷ 4", 25),
        ("8/(4/2)", 4),
        ("2*3+4", 10),
        ("2*(3+4)", 14),
        ("10-3-2", 5),
        ("7/2", Fraction(7, 2)),
    ],
)
def test_parse_and_evaluate(text: str, value: Fraction) -> None:
    assert evaluate(parse(text)) == value


@pytest.mark.parametrize(
    "text", ["", "-5+3", "2**3", "2.5+1", "3+", "(3+4", "3+4)", "abc", "3 4", "__import__('os')", "1/(2-2)"]
)
def test_invalid_expressions_raise_expr_error(text: str) -> None:
    with pytest.raises(ExprError):
        evaluate(parse(text))


def test_too_deep_or_long_is_rejected() -> None:
    with pytest.raises(ExprError, match="nested"):
        parse("(" * 60 + "1" + ")" * 60)
    with pytest.raises(ExprError, match="longer"):
        parse("1+" * 200 + "1")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789+-*/()x×÷− .a=", max_size=40))
def test_parser_never_crashes_on_garbage(text: str) -> None:
    with contextlib.suppress(ExprError):
        evaluate(parse(text))


# ---------------------------------------------------------------- canonical form


@pytest.mark.parametrize("padded", ["(6+77)*(2-1)", "6+77*(2-1)", "77+6+2-2", "(77+6)/(5-4)", "6*(3/3)+77"])
def test_design_examples_are_one_solution(padded: str) -> None:
    assert canonical(padded) == canonical("6+77")


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("10-(3-2)", "10-3+2"),
        ("8/(4/2)", "8*2/4"),
        ("9-3*(2-7)", "9+3*(7-2)"),
        ("59", "59+78-6*13"),  # a group of terms summing to 0 is padding
        ("59", "59*78/(6*13)"),  # a group of factors with product 1 is padding
        ("(2+3)*4", "4*(3+2)"),
        ("(1-2)*(3/3)", "1-2"),
        ("84+18*(3-2)/(2+16)", "84+18/(2+16)"),  # a factor worth 1 inside a term worth 1 is padding
        ("84+18/(2+16)*(7/7)", "84+18/(16+2)"),
        ("84+18/(2+16)+5-5", "18/(2+16)+84"),
        ("80+5*7/(5*7)", "80+7/7"),  # one cancelling pair goes; the term keeps the other
    ],
)
def test_equivalent_forms(a: str, b: str) -> None:
    assert canonical(a) == canonical(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("50+25", "3*25"),
        ("(3+4)*5", "3*5+4*5"),  # distributivity is not applied
        ("78-(6+13)", "59"),
        ("80+(3-2)", "80+1"),  # a difference is a sum of terms, never a padding unit
        ("84+18/(2+16)", "84+2/(18-16)"),  # added terms worth 1, built differently
        ("84+18/(2+16)", "84+1"),
        ("80+6/(20-14)", "80+14/(20-6)"),
        ("80+6/(20-14)", "80+(20-14)/6"),
        ("80+5/5", "80+1"),
        ("80+5/5", "80+(6-5)"),
    ],
)
def test_different_solutions_stay_distinct(a: str, b: str) -> None:
    assert canonical(a) != canonical(b)


_leaf = st.integers(min_value=1, max_value=30).map(Num)
_trees = st.recursive(_leaf, lambda kids: st.builds(BinOp, st.sampled_from("+-*/"), kids, kids), max_leaves=6)


def _commute(node: Num | BinOp) -> Num | BinOp:
    """Swap the operands of every + and × (and recurse)."""
    if isinstance(node, Num):
        return node
    left, right = _commute(node.left), _commute(node.right)
    return BinOp(node.op, right, left) if node.op in "+*" else BinOp(node.op, left, right)


def _regroup(node: Num | BinOp) -> Num | BinOp:
    """Apply (a+b)+c = a+(b+c), (ab)c = a(bc), a-(b-c) = a-b+c and a/(b/c) = ac/b where they fit."""
    if isinstance(node, Num):
        return node
    left, right = _regroup(node.left), _regroup(node.right)
    if node.op in "+*" and isinstance(left, BinOp) and left.op == node.op:
        return BinOp(node.op, left.left, BinOp(node.op, left.right, right))
    if node.op == "-" and isinstance(right, BinOp) and right.op == "-":
        return BinOp("+", BinOp("-", left, right.left), right.right)
    if node.op == "/" and isinstance(right, BinOp) and right.op == "/":
        return BinOp("/", BinOp("*", left, right.right), right.left)
    return BinOp(node.op, left, right)


@settings(max_examples=300, deadline=None)
@given(_trees)
def test_canonical_invariant_under_commuting_regrouping_and_reparsing(tree: Num | BinOp) -> None:
    try:
        key = canonical(tree)
    except ExprError:  # division by zero somewhere
        return
    assert canonical(_commute(tree)) == key
    assert canonical(_regroup(tree)) == key
    assert canonical(to_text(tree)) == key


@settings(max_examples=200, deadline=None)
@given(_trees, st.integers(min_value=1, max_value=30))
def test_neutral_padding_changes_nothing(tree: Num | BinOp, k: int) -> None:
    try:
        key = canonical(tree)
    except ExprError:
        return
    zero, one = BinOp("-", Num(k), Num(k)), BinOp("/", Num(k), Num(k))
    unit = BinOp("-", Num(k + 1), Num(k))
    assert canonical(BinOp("+", tree, zero)) == key
    assert canonical(BinOp("-", tree, zero)) == key
    # A tree worth ±1 is itself a unit, so "which of two units is the padding" has no single answer.
    assume(abs(evaluate(tree)) != 1)
    assert canonical(BinOp("*", tree, one)) == key
    assert canonical(BinOp("/", tree, unit)) == key
    assert canonical(BinOp("*", unit, tree)) == key


@settings(max_examples=200, deadline=None)
@given(_trees, st.integers(min_value=1, max_value=30))
def test_exact_pair_padding_changes_nothing(tree: Num | BinOp, k: int) -> None:
    """``+k−k`` and ``·k/k`` applied to a product or a single number (sums may bridge, see expr.py)."""
    try:
        key = canonical(tree)
    except ExprError:
        return
    assume(abs(evaluate(tree)) != 1)  # a tree worth ±1 is a unit itself (see above)
    assert canonical(BinOp("/", BinOp("*", tree, Num(k)), Num(k))) == key
    if isinstance(tree, Num):
        assert canonical(BinOp("-", BinOp("+", tree, Num(k)), Num(k))) == key


def test_distinct_solutions() -> None:
    exprs = ["50+25", "25+50", "3*25", "(50+25)*(7-6)", "50-25", "7*11"]
    found = distinct_solutions(exprs, [3, 7, 25, 50], 75)
    assert list(found.values()) == ["50+25", "3*25"]


def test_check_solution_reasons() -> None:
    with pytest.raises(ExprError, match="uses 25 3 times but it is given once"):
        check_solution("25+25+25", [3, 7, 25, 50], 75)
    with pytest.raises(ExprError, match="evaluates to 57"):
        check_solution("50+7", [3, 7, 25, 50], 75)
    with pytest.raises(ExprError, match="uses 75, which is not given"):
        check_solution("75", [3, 7, 25, 50], 75)
    with pytest.raises(ExprError, match="fewer than two"):
        check_solution("25", [3, 7, 25, 50], 25)  # a bare number, even one equal to the target
    with pytest.raises(ExprError, match="padding around the bare number"):
        check_solution("25*(50-7*7)", [3, 7, 7, 25, 50], 25)
    with pytest.raises(ExprError, match="padding around the bare number"):
        check_solution("25+7-7", [3, 7, 7, 25, 50], 25)
    assert check_solution("2*9-7", [2, 7, 9], 11)


@pytest.mark.parametrize("padded", ["6+77", "(6+77)*(2-1)", "6+77*(2-1)", "77+6+2-2", "(77+6)/(2-1)"])
def test_the_rules_hand_worked_one_solution(padded: str) -> None:
    numbers = [6, 77, 2, 2, 1]
    assert check_solution(padded, numbers, 83) == check_solution("6+77", numbers, 83)
    assert len(distinct_solutions([padded, "77+6"], numbers, 83)) == 1


def test_the_rules_hand_worked_two_solutions() -> None:
    numbers = [84, 18, 2, 16]
    found = distinct_solutions(["84+18/(2+16)", "84+2/(18-16)", "84+(16+2)/18", "84*(2+16)/18"], numbers, 85)
    # the third is a third way to build 1 (a ratio the other way up); the fourth is 84 padded by a factor 1
    assert list(found.values()) == ["84+18/(2+16)", "84+2/(18-16)", "84+(16+2)/18"]
    with pytest.raises(ExprError, match="evaluates to 84"):
        check_solution("84*(2+16)/18", numbers, 85)
    with pytest.raises(ExprError, match="padding around the bare number"):
        check_solution("84*(2+16)/18", numbers, 84)
    assert count_solutions(numbers, 85) == len(solve(numbers, 85)) >= 3


def test_a_bare_target_is_never_counted() -> None:
    assert all(number_count(k) >= 2 for k in solve([59, 78, 6, 13], 59))
    assert "59" not in solve([59, 78, 6, 13], 59).values()
    p = problem([59, 78, 6, 13], 59)
    s = TASK.score(p, "59; 59+78-6*13; 78-6-13")
    assert s.correct == 1 and s.details["valid"] == ["78-6-13"]
    assert [d["expr"] for d in s.details["invalid"]] == ["59", "59+78-6*13"]


# ---------------------------------------------------------------- solver


def _naive(numbers: list[int], target: int) -> set:
    """Every expression over every subset, canonicalized: a slow, obviously-correct reference."""

    def exprs(items: list[str]) -> list[str]:
        if len(items) == 1:
            return items
        out = []
        for mask in range(1, (1 << len(items)) - 1):
            left = [x for i, x in enumerate(items) if mask >> i & 1]
            right = [x for i, x in enumerate(items) if not mask >> i & 1]
            for a in exprs(left):
                for b in exprs(right):
                    out += [f"({a}{op}{b})" for op in "+-*/"]
        return out

    found = set()
    for size in range(1, len(numbers) + 1):
        for subset in itertools.combinations([str(n) for n in numbers], size):
            for text in exprs(list(subset)):
                with contextlib.suppress(ExprError):
                    found.add(check_solution(text, numbers, target))
    return found


@pytest.mark.parametrize(("numbers", "target"), [([3, 7, 25, 50], 75), ([2, 2, 3], 7), ([1, 4, 6, 9], 24)])
def test_solver_matches_naive_enumeration(numbers: list[int], target: int) -> None:
    assert set(solve(numbers, target)) == _naive(numbers, target)


def test_solver_known_problem() -> None:
    found = solve([3, 7, 25, 50], 75)
    assert sorted(found.values()) == ["(7*25+50)/3", "25+50", "3*(50-25)", "3*25"]
    assert count_solutions([6, 77, 2, 1], 83) == 1  # 6+77 and its paddings
    assert solution_counts([3, 7, 25, 50], 70, 80)[75] == 4


def test_solver_tabulates_each_sub_multiset_once_and_never_the_full_set() -> None:
    """What keeps the solver at a few ms per problem, counted instead of timed (``bench/countdown_solver.py``
    prints the time): 4 distinct numbers have C(4,1)+C(4,2)+C(4,3) = 4+6+4 = 14 proper sub-multisets, and
    each is tabulated once (the full set's hits are looked up, never tabulated); a second solve of the same
    numbers tabulates nothing."""
    from shared.tasks import countdown_solver

    for numbers, target in [([13, 47, 88, 5], 64), ([91, 2, 58, 33], 27), ([11, 12, 13, 14], 50)]:
        countdown_solver._table.cache_clear()
        solve(numbers, target)
        info = countdown_solver._table.cache_info()
        assert (info.misses, info.currsize) == (14, 14), (numbers, info)
        solve(numbers, target + 1)
        assert countdown_solver._table.cache_info().misses == 14  # all 14 tables reused
    # a repeated number: {5, 5, 7} has the proper sub-multisets {5}, {7}, {5, 5}, {5, 7} = 4, not 2^3 - 2 = 6
    countdown_solver._table.cache_clear()
    solve([5, 5, 7], 17)
    assert countdown_solver._table.cache_info().misses == 4


def test_solutions_starting_with() -> None:
    assert solutions_starting_with([3, 7, 25, 50], 75, (25, 50)) == ["25+50", "3*(50-25)"]
    assert solutions_starting_with([3, 7, 25, 50], 75, (3, 25)) == ["3*25"]
    with pytest.raises(ValueError, match="not drawn"):
        solutions_starting_with([3, 7, 25, 50], 75, (3, 3))


# ---------------------------------------------------------------- generator and splits


def test_generate_is_deterministic_and_has_enough_solutions() -> None:
    a, b = generate(3, seed=5), generate(3, seed=5)
    assert a == b
    assert [p.id for p in a] == ["cd-5-0", "cd-5-1", "cd-5-2"]
    for p in a:
        assert count_solutions(p.payload["numbers"], p.payload["target"]) >= 4
        assert 10 <= p.payload["target"] <= 100 and len(p.payload["numbers"]) == 4


def test_generate_respects_exclude() -> None:
    first = generate(2, seed=9)
    keys = [problem_key(p.payload["numbers"], p.payload["target"]) for p in first]
    again = generate(2, seed=9, exclude=keys)
    assert not {problem_key(p.payload["numbers"], p.payload["target"]) for p in again} & set(keys)


@pytest.mark.parametrize(("path", "prefix"), [(TEST_FILE, "cd-test"), (TEST2_FILE, "cd-test2")])
def test_held_out_split_files(path: Path, prefix: str) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == TEST_SIZE == 400
    assert rows[0]["id"] == f"{prefix}-0" and set(rows[0]) == {"id", "numbers", "target", "n_solutions"}
    assert len({problem_key(r["numbers"], r["target"]) for r in rows}) == 400
    for r in rows[::20]:  # 20 problems, spread over the file: >= 4 strictly distinct solutions each
        assert count_solutions(r["numbers"], r["target"]) >= r["n_solutions"] == 4


def test_the_held_out_splits_and_the_train_problems_are_disjoint() -> None:
    test = {problem_key(p.payload["numbers"], p.payload["target"]) for p in load_test_split()}
    test2 = {problem_key(p.payload["numbers"], p.payload["target"]) for p in load_test2_split()}
    assert not test & test2 and held_out_keys() == test | test2
    rows = [json.loads(line) for line in TRAIN_FILE.read_text().splitlines()]
    train = {problem_key(r["numbers"], r["target"]) for r in rows}
    assert len(train) == len(rows) > 10_000 and not train & (test | test2)
    for r in rows[::1000]:
        assert count_solutions(r["numbers"], r["target"]) >= r["n_solutions"] == 4


def test_held_out_splits_are_reproducible_from_their_seeds() -> None:
    from shared.tasks.countdown import TEST2_SEED, TEST_SEED

    assert generate(3, TEST_SEED, id_prefix="cd-test") == list(load_test_split()[:3])
    assert generate(3, TEST2_SEED, id_prefix="cd-test2", exclude=[problem_key(
        p.payload["numbers"], p.payload["target"]) for p in load_test_split()]) == list(load_test2_split()[:3])


def test_problems_splits(tmp_path: Path) -> None:
    test = TASK.problems("test", 5)
    assert [p.id for p in test] == [f"cd-test-{k}" for k in range(5)]
    assert [p.id for p in TASK.problems("test2", 2)] == ["cd-test2-0", "cd-test2-1"]
    test_keys = held_out_keys()
    train = TASK.problems("train", 3, seed=TEST_SEED_FOR_TRAIN)
    assert len(train) == 3
    assert not {problem_key(p.payload["numbers"], p.payload["target"]) for p in train} & test_keys
    with pytest.raises(ValueError, match="400"):
        TASK.problems("test", 401)
    with pytest.raises(ValueError, match="split"):
        TASK.problems("dev", 1)
    # any JSONL file is a split: flat payloads with or without ids, or {"id", "payload"} rows
    path = tmp_path / "mine.jsonl"
    path.write_text('{"numbers": [3, 7, 25, 50], "target": 75}\n\n'
                    '{"id": "x", "payload": {"numbers": [1, 2, 3], "target": 6, "n_solutions": 2}}\n')
    mine = TASK.problems(str(path), 2)
    assert [p.id for p in mine] == ["mine-0", "x"] and mine[1].payload["n_solutions"] == 2
    with pytest.raises(ValueError, match="has 2 problems"):
        TASK.problems(str(path), 3)
    path.write_text('{"numbers": [3, "a"], "target": 75}\n')
    with pytest.raises(ValueError, match="problem 1"):
        TASK.problems(str(path), 1)
    with pytest.raises(FileNotFoundError):
        TASK.problems(str(tmp_path / "none.jsonl"), 1)


TEST_SEED_FOR_TRAIN = 26658  # the test seed itself: train must still skip every test problem


def test_train_with_the_test_seed_skips_test_problems() -> None:
    train = TASK.problems("train", 2, seed=TEST_SEED_FOR_TRAIN)
    assert all(problem_key(p.payload["numbers"], p.payload["target"]) not in held_out_keys() for p in train)


# ---------------------------------------------------------------- task interface


def test_get_task_and_prompts() -> None:
    task = get_task("countdown")
    assert task.name == "countdown" and task.default_capacity == 2
    p = problem([3, 7, 25, 50], 75)
    assert task.organizer_prompt(p, Mode.SEQUENTIAL) == (
        "Countdown. Numbers: 3 7 25 50. Target: 75. Find 4 distinct solutions.\n"
    )
    assert task.organizer_prompt(p, Mode.ASYNCTHINK) == (
        "Countdown. Numbers: 3 7 25 50. Target: 75. Find 4 distinct solutions.\nYou may fork workers.\n"
    )
    assert task.worker_prompt("Try 25 and 50 first. ") == "Worker. Try 25 and 50 first.\n"


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"numbers": [1, 2], "target": "7"}, "target"),
        ({"numbers": "1 2", "target": 7}, "numbers"),
        ({"numbers": [1, True], "target": 7}, "numbers"),
        ({"numbers": [1, 2], "target": 7, "n_solutions": 0}, "n_solutions"),
    ],
)
def test_problem_from_payload_rejects(payload: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TASK.problem_from_payload(payload)


def test_problem_from_payload_default_id_is_stable() -> None:
    a = TASK.problem_from_payload({"numbers": [3, 7], "target": 10})
    b = TASK.problem_from_payload({"numbers": [7, 3], "target": 10})
    assert a.id == b.id and a.id.startswith("cd-") and a.payload["n_solutions"] == 4


def test_split_answer() -> None:
    text = "50+25 = 75; 3*25\n- 3*(50-25)\n1. (7*25+50)/3\n\n75 = 3×25."
    assert split_answer(text) == ["50+25", "3*25", "3*(50-25)", "(7*25+50)/3", "3×25"]


def test_score_counts_distinct_valid_solutions() -> None:
    p = problem([3, 7, 8, 25, 50], 75)
    s = TASK.score(p, "50+25; 25+50; (50+25)*(8-7); 3*25; 50+7; 25*3*3")
    assert s.accuracy == 0.5 and s.correct == 2 and s.needed == 4
    assert s.details["valid"] == ["50+25", "3*25"]
    assert s.details["duplicate"] == ["25+50", "(50+25)*(8-7)"]
    assert s.details["ignored"] == ["50+7", "25*3*3"]  # only the first n_s expressions count
    bad = TASK.score(p, "50+7; 25*3*3; 50+25")
    assert [d["expr"] for d in bad.details["invalid"]] == ["50+7", "25*3*3"] and bad.correct == 1
    full = TASK.score(problem([3, 7, 25, 50], 75), "50+25; 3*25; 3*(50-25); (7*25+50)/3")
    assert full.accuracy == 1.0 and full.correct == 4
    assert TASK.score(p, None).accuracy == 0.0
    assert TASK.score(p, "").accuracy == 0.0


def test_score_caps_at_n_solutions() -> None:
    p = problem([3, 7, 25, 50], 75, n_s=2)
    s = TASK.score(p, "50+25; 3*25; 3*(50-25)")
    assert s.accuracy == 1.0 and s.correct == 2 and s.needed == 2
    assert s.details["ignored"] == ["3*(50-25)"]
    spam = TASK.score(problem([3, 7, 25, 50], 75), "1+1; 2+2; 3+3; 4+4; 50+25; 3*25; 3*(50-25); (7*25+50)/3")
    assert spam.accuracy == 0.0  # guesses past the first n_s buy nothing


def test_aggregate_ranks_by_traces() -> None:
    p = problem([3, 7, 25, 50], 75)
    answers = [
        "50+25; 3*25",
        "25+50; 3*(50-25); 25+50",  # counted once for this trace
        "3*(50-25); 50+25; 50+7",
        None,
        "(7*25+50)/3",
    ]
    assert TASK.aggregate(answers, p) == "50+25; 3*(50-25); 3*25; (7*25+50)/3"
    assert TASK.aggregate(["50+7; 50+7"], p) is None
    assert TASK.aggregate(["50+7", "50+7", "1+1"]) == "50+7; 1+1"  # without a problem: parse-only
    assert TASK.aggregate([None, ""]) is None


def test_countdown_metrics() -> None:
    scores = [Score(accuracy=c / 4, correct=c, needed=4) for c in (0, 1, 2, 3, 4)]
    assert countdown_metrics(scores) == {
        "at_least_1": 80.0,
        "at_least_2": 60.0,
        "at_least_3": 40.0,
        "all_correct": 20.0,
    }
    assert countdown_metrics([])["all_correct"] == 0.0


def test_doctests() -> None:
    import doctest

    import shared.tasks.countdown_solver
    import shared.tasks.expr

    for module in (shared.tasks.expr, shared.tasks.countdown_solver):
        assert doctest.testmod(module).failed == 0
