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

from shared.tasks import countdown, get_task
from shared.tasks.base import Mode, Problem, Score
from shared.tasks.countdown import (
    TEST2_FILE,
    TEST_FILE,
    TEST_SIZE,
    CountdownTask,
    build_test2_split,
    build_test_split,
    build_train_problems,
    countdown_metrics,
    generate,
    held_out_keys,
    load_test2_split,
    load_test_split,
    problem_key,
    split_answer,
    vote,
    write_jsonl,
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


# ---------------------------------------------------------------- boundaries (mutation testing, docs/testing.md)


def _error(payload: object) -> str:
    with pytest.raises(ValueError) as err:
        TASK.problem_from_payload(payload)  # type: ignore[arg-type]
    return str(err.value)


def test_the_count_of_numbers_is_1_to_8() -> None:
    # MAX_NUMBERS = 8: eight numbers pass, a ninth is refused; one number passes, none is refused
    eight = TASK.problem_from_payload({"numbers": [1, 2, 3, 4, 5, 6, 7, 8], "target": 36})
    assert eight.payload["numbers"] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert TASK.problem_from_payload({"numbers": [7], "target": 7}).payload["numbers"] == [7]
    message = "countdown 'numbers' must be a list of 1 to 8 integers"
    assert _error({"numbers": [1, 2, 3, 4, 5, 6, 7, 8, 9], "target": 45}) == message
    assert _error({"numbers": [], "target": 7}) == message
    assert _error({"numbers": "1 2", "target": 7}) == message  # a string of 3 characters is no list
    assert _error({"target": 7}) == message


def test_number_target_and_n_solutions_bounds() -> None:
    # numbers 1..10_000, target 1..1_000_000, n_solutions 1..16: both ends pass, one past either end fails
    ok = TASK.problem_from_payload({"numbers": [1, 10_000], "target": 1_000_000, "n_solutions": 16})
    assert ok.payload == {"numbers": [1, 10_000], "target": 1_000_000, "n_solutions": 16}
    assert TASK.problem_from_payload({"numbers": [2, 3], "target": 1, "n_solutions": 1}).payload["target"] == 1
    assert _error({"numbers": [0, 3], "target": 3}) == "countdown 'numbers' must be 1 to 10_000, got 0"
    assert _error({"numbers": [10_001], "target": 3}) == "countdown 'numbers' must be 1 to 10_000, got 10001"
    assert _error({"numbers": [2, 3], "target": 0}) == "countdown 'target' must be 1 to 1_000_000, got 0"
    assert _error({"numbers": [2], "target": 1_000_001}) == "countdown 'target' must be 1 to 1_000_000, got 1000001"
    assert _error({"numbers": [2], "target": 2, "n_solutions": 0}) == "countdown 'n_solutions' must be 1 to 16, got 0"
    assert _error({"numbers": [2], "target": 2, "n_solutions": 17}) == "countdown 'n_solutions' must be 1 to 16, got 17"


def test_payload_type_errors_quote_the_value_shortened() -> None:
    assert _error([1, 2]) == "countdown payload must be an object with 'numbers' and 'target'"
    assert _error({"numbers": [1, True], "target": 7}) == "countdown 'numbers' must be integers, got True"
    assert _error({"numbers": [1, 2], "target": "7"}) == "countdown payload field 'target' must be an integer, got '7'"
    assert _error({"numbers": [1], "target": 1, "n_solutions": 2.0}) == (
        "countdown payload field 'n_solutions' must be an integer, got 2.0"
    )
    field = "countdown payload field 'target' must be an integer, got "
    # repr of 38 letters is 40 characters: shown whole; of 39 letters, 41: cut to 40 and "…"
    assert _error({"numbers": [1], "target": "a" * 38}) == field + "'" + "a" * 38 + "'"
    assert _error({"numbers": [1], "target": "a" * 39}) == field + "'" + "a" * 39 + "…"
    # integers of 30 digits are quoted (10**30 - 1 is 30 nines); from 10**30 (31 digits) on, only counted
    too_big = "countdown 'target' must be 1 to 1_000_000, got "
    assert _error({"numbers": [1], "target": 10**30 - 1}) == too_big + "9" * 30
    assert _error({"numbers": [1], "target": 10**30}) == too_big + "a 31-digit number"
    assert _error({"numbers": [1], "target": -(10**30)}) == too_big + "a 32-digit number"  # the sign counts
    assert _error({"numbers": [10**40], "target": 5}) == "countdown 'numbers' must be 1 to 10_000, got a 41-digit number"


def test_the_default_id_is_the_digest_of_numbers_target_and_n_solutions() -> None:
    # sha1('[[3, 7], 10, 4]') starts 85f023ee54: sorted numbers, target, n_s
    assert TASK.problem_from_payload({"numbers": [7, 3], "target": 10}).id == "cd-85f023ee54"
    assert TASK.problem_from_payload({"numbers": [7, 3], "target": 10}, "mine").id == "mine"


def test_generate_checks_its_arguments() -> None:
    message = "need n_numbers >= 1, low <= high, target_low <= target_high, n_solutions >= 1"
    for kwargs in ({"n_numbers": 0}, {"low": 6, "high": 5}, {"target_low": 11, "target_high": 10}, {"n_solutions": 0}):
        with pytest.raises(ValueError) as err:
            generate(1, 1, **kwargs)
        assert str(err.value) == message
    # the boundaries are allowed: one number, low == high, target_low == target_high, one solution
    assert generate(0, 1, n_numbers=1, low=5, high=5, target_low=7, target_high=7, n_solutions=1) == []


def test_generate_never_repeats_a_problem_and_says_when_it_runs_out() -> None:
    # numbers [2, 2], targets 1..4, one solution needed: only 4 (2+2, 2*2) and 1 (2/2) are reachable
    # (2-2 = 0 is padding, out of range anyway): two problems exist, so a third cannot be found
    small = {"n_numbers": 2, "low": 2, "high": 2, "target_low": 1, "target_high": 4, "n_solutions": 1}
    two = generate(2, 1, **small)
    assert sorted(p.payload["target"] for p in two) == [1, 4]
    with pytest.raises(RuntimeError) as err:
        generate(3, 1, max_draws=50, **small)
    assert str(err.value) == (
        "found only 2 of 3 problems in 50 draws; widen the number or target range, lower n_solutions or raise max_draws"
    )
    # the last problem found on the last draw is still returned
    assert [p.payload for p in generate(1, 1, max_draws=1, **small)] == [{"numbers": [2, 2], "target": 4, "n_solutions": 1}]


@pytest.mark.parametrize(
    ("seed", "payload"),
    [
        (103, {"numbers": [32, 12, 48, 26], "target": 10, "n_solutions": 4}),  # target_low = 10 is reachable
        (178, {"numbers": [58, 31, 71, 29], "target": 100, "n_solutions": 4}),  # so is target_high = 100
    ],
)
def test_generate_defaults_reach_both_target_bounds(seed: int, payload: dict) -> None:
    [p] = generate(1, seed)
    assert p.payload == payload and p.id == f"cd-{seed}-0"
    assert count_solutions(payload["numbers"], payload["target"]) >= 4


def test_train_problems_default_to_seed_0() -> None:
    train = TASK.problems("train", 2)
    assert [p.id for p in train] == ["cd-0-0", "cd-0-1"]
    assert train == generate(2, 0, exclude=held_out_keys())


def test_score_details() -> None:
    p = problem([3, 7, 25, 50], 75)
    s = TASK.score(p, "50+7; 25+50")
    assert s.details["invalid"] == [{"expr": "50+7", "reason": "evaluates to 57, not 75"}]
    assert TASK.score(p, None) == Score(accuracy=0.0, correct=0, needed=4, details={"error": "no answer"})
    assert split_answer("3*25X") == ["3*25X"]  # a trailing x or X is a multiplication sign, not punctuation


def test_vote_keeps_n_solutions_forms() -> None:
    answers = ["50+25; 3*25; 3*(50-25); (7*25+50)/3; 50-25+25+25"]  # five forms, the last one invalid
    p2 = problem([3, 7, 25, 50], 75, n_s=2)
    assert TASK.aggregate(answers, p2) == "50+25; 3*25"  # the problem's n_s = 2
    assert vote(answers, p2, n_solutions=3) == "50+25; 3*25; 3*(50-25)"  # an explicit n_s wins
    # without a problem: the default 4, and every parsable expression counts (evaluating to anything)
    assert vote(answers) == "50+25; 3*25; 3*(50-25); (7*25+50)/3"
    # an expression that does not parse is skipped, the rest of its trace still counts: 1+1 from two
    # traces ranks above 5+5 from one (had trace 1 stopped at 2**3, 5+5 would come first, seen first)
    assert vote(["2**3; 1+1", "5+5; 1+1"]) == "1+1; 5+5"


def test_vote_counts_a_trace_once_per_form() -> None:
    # trace 1 repeats "1+2" (and its commuted "2+1") three times; "3+4" comes from two traces.
    # counted once per trace: 1+2 -> 1, 3+4 -> 2, so 3+4 ranks first
    assert vote(["1+2; 2+1; 1+2; 3+4", "3+4"], n_solutions=2) == "3+4; 1+2"


def test_countdown_metrics_of_nothing_are_zero() -> None:
    assert countdown_metrics([]) == {"at_least_1": 0.0, "at_least_2": 0.0, "at_least_3": 0.0, "all_correct": 0.0}


def test_write_jsonl_with_and_without_ids(tmp_path: Path) -> None:
    problems = [problem([3, 7, 25, 50], 75), TASK.problem_from_payload({"numbers": [1, 2], "target": 3}, "q")]
    path = tmp_path / "p.jsonl"
    write_jsonl(problems, path)
    assert path.read_text() == (
        '{"id": "p", "numbers": [3, 7, 25, 50], "target": 75, "n_solutions": 4}\n'
        '{"id": "q", "numbers": [1, 2], "target": 3, "n_solutions": 4}\n'
    )
    write_jsonl(problems[1:], path, with_ids=False)
    assert path.read_text() == '{"numbers": [1, 2], "target": 3, "n_solutions": 4}\n'


def test_build_train_problems_skips_held_out_and_repeated_problems() -> None:
    # the same seed twice: its second batch repeats the first, so only 2 problems remain
    train = build_train_problems(seeds=(5, 5), per_seed=2)
    assert [p.id for p in train] == ["cd-5-0", "cd-5-1"]
    assert train == generate(2, 5, exclude=held_out_keys())
    both = build_train_problems(seeds=(5, 9), per_seed=1)
    assert [p.id for p in both] == ["cd-5-0", "cd-9-0"] and {p.task for p in both} == {"countdown"}
    # the test split's own seed draws the test problems first: train must skip them all the same
    from_test_seed = build_train_problems(seeds=(countdown.TEST_SEED,), per_seed=2)
    assert not {problem_key(p.payload["numbers"], p.payload["target"]) for p in from_test_seed} & held_out_keys()


def test_the_split_builders_rebuild_the_committed_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(countdown, "TEST_SIZE", 3)  # the first 3 problems of each file
    assert build_test_split() == list(load_test_split()[:3])
    assert build_test2_split() == list(load_test2_split()[:3])


def test_main_rewrites_the_splits_and_the_train_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "package" / "data"  # two folders that do not exist yet
    test_file, test2_file = data / "countdown_test.jsonl", data / "countdown_test2.jsonl"
    monkeypatch.setattr(countdown, "TEST_SIZE", 3)
    monkeypatch.setattr(countdown, "TEST_FILE", test_file)
    monkeypatch.setattr(countdown, "TEST2_FILE", test2_file)
    real_build_train = countdown.build_train_problems  # 15,000 problems: 2 from one seed here
    monkeypatch.setattr(countdown, "build_train_problems", lambda: real_build_train(seeds=(5,), per_seed=2))
    try:
        countdown.main([])
        countdown.main(["--train", str(tmp_path / "train.jsonl")])  # again, into the folder made above
        # main re-reads what it wrote: the loaders now return the 3-problem files
        assert [p.id for p in load_test_split()] == ["cd-test-0", "cd-test-1", "cd-test-2"]
        assert [p.id for p in load_test2_split()] == ["cd-test2-0", "cd-test2-1", "cd-test2-2"]
        # train problems avoid the held-out problems main just wrote
        expected_train = [p.payload for p in generate(2, 5, exclude=held_out_keys())]
    finally:
        load_test_split.cache_clear()  # the next reader loads the committed files again
        load_test2_split.cache_clear()
    committed = [json.loads(line) for line in TEST_FILE.read_text().splitlines()[:3]]
    assert [json.loads(line) for line in test_file.read_text().splitlines()] == committed
    committed2 = [json.loads(line) for line in TEST2_FILE.read_text().splitlines()[:3]]
    assert [json.loads(line) for line in test2_file.read_text().splitlines()] == committed2
    train_rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert train_rows == expected_train  # without ids
    assert capsys.readouterr().out == (
        f"wrote 3 problems to {test_file} and 3 to {test2_file}\n" * 2
        + f"wrote 2 train problems to {tmp_path / 'train.jsonl'}\n"
    )


def test_main_says_what_it_does(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        countdown.main(["--help"])
    assert done.value.code == 0
    raw = capsys.readouterr().out
    assert "\n\nrebuild the committed countdown problem files\n\n" in raw  # the description, on its own
    out = " ".join(raw.split())  # argparse wraps lines
    assert out.endswith("--train TRAIN also write the train problems to this path")
