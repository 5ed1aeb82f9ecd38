"""4x4 Sudoku: solver, unique-solution generator, splits, verifier, vote and prompts."""

from __future__ import annotations

import pytest

from shared.tasks import get_task
from shared.tasks.base import Mode
from shared.tasks.sudoku import (
    TEST_SIZE,
    SudokuTask,
    check_answer,
    count_solutions,
    generate,
    load_test_split,
    normalize_answer,
    parse_grid,
)

TASK = SudokuTask()
PUZZLE = "123.....4..1...."  # hand-made; SOLUTION is its only completion
SOLUTION = "1234341243212143"


def test_solver_counts() -> None:
    assert count_solutions(parse_grid(PUZZLE)) == 1
    assert count_solutions(parse_grid("." * 16), limit=1000) == 288  # all 4x4 Sudoku grids
    assert count_solutions(parse_grid("11" + "." * 14)) == 0


def test_generated_puzzles_have_unique_solutions() -> None:
    problems = generate(20, seed=3)
    assert [p.id for p in problems[:2]] == ["sd-3-0", "sd-3-1"]
    assert len({p.payload["puzzle"] for p in problems}) == 20
    for p in problems:
        cells = parse_grid(p.payload["puzzle"])
        assert count_solutions(cells) == 1
        assert check_answer(p.payload["puzzle"], p.reference) == p.reference
    assert generate(5, seed=3) == problems[:5]


def test_splits() -> None:
    test = TASK.problems("test", TEST_SIZE)
    assert len(test) == 100 and test[0].id == "sd-test-0" and list(load_test_split()) == test
    train = TASK.problems("train", 30, seed=1)
    assert not {p.payload["puzzle"] for p in train} & {p.payload["puzzle"] for p in test}
    with pytest.raises(ValueError, match="100"):
        TASK.problems("test", 101)
    with pytest.raises(ValueError, match="split"):
        TASK.problems("dev", 1)


def test_problem_from_payload() -> None:
    p = TASK.problem_from_payload({"puzzle": "1230 0000 4001 0000"}, "x")
    assert p.payload == {"puzzle": PUZZLE} and p.reference == SOLUTION and p.id == "x"
    assert TASK.problem_from_payload({"puzzle": PUZZLE}).id == "sd-1230000040010000"
    with pytest.raises(ValueError, match="16 cells"):
        TASK.problem_from_payload({"puzzle": "123"})
    with pytest.raises(ValueError, match="'5'"):
        TASK.problem_from_payload({"puzzle": "5" + "." * 15})
    with pytest.raises(ValueError, match="no solution"):
        TASK.problem_from_payload({"puzzle": "11" + "." * 14})
    ambiguous = TASK.problem_from_payload({"puzzle": "." * 16})
    assert ambiguous.reference is None


@pytest.mark.parametrize(
    "answer", [SOLUTION, "1234 3412 4321 2143", "1234\n3412\n4321\n2143", "|1 2|3 4|\n|3 4|1 2|\n4321, 2143"]
)
def test_score_accepts_separators(answer: str) -> None:
    p = TASK.problem_from_payload({"puzzle": PUZZLE})
    s = TASK.score(p, answer)
    assert s.accuracy == 1.0 and s.correct == 1 and s.details == {"grid": SOLUTION}


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (None, "no answer"),
        ("1234", "16 digits"),
        ("1234 3412 4321 2145", "16 digits"),
        ("row 1234 3412 4321 2143", "16 digits"),
        ("2134 3412 4321 2143", "changes the given"),
        ("1234 3412 4321 2134", "repeats"),
    ],
)
def test_score_rejects(answer: str | None, reason: str) -> None:
    p = TASK.problem_from_payload({"puzzle": PUZZLE})
    s = TASK.score(p, answer)
    assert s.accuracy == 0.0 and reason in s.details["error"]


def test_any_valid_completion_counts() -> None:
    p = TASK.problem_from_payload({"puzzle": "." * 16})
    assert TASK.score(p, SOLUTION).accuracy == 1.0


def test_aggregate_majority_vote() -> None:
    wrong = "1234 3412 4321 2134"
    assert TASK.aggregate([wrong, SOLUTION, "1234 3412 4321 2143", None, "junk"]) == SOLUTION
    assert TASK.aggregate([wrong, wrong, SOLUTION]) == normalize_answer(wrong)
    p = TASK.problem_from_payload({"puzzle": PUZZLE})
    assert TASK.aggregate([wrong, wrong, SOLUTION], p) == SOLUTION  # only correct ones vote
    assert TASK.aggregate([None, "junk"]) is None


def test_prompts() -> None:
    task = get_task("sudoku")
    assert task.name == "sudoku" and task.default_capacity == 2
    p = TASK.problem_from_payload({"puzzle": PUZZLE})
    base = "Sudoku 4x4. Rows: 123. .... 4..1 ....\nFill each . so every row, column and 2x2 box has 1-4.\n"
    assert task.organizer_prompt(p, Mode.SEQUENTIAL) == base
    assert task.organizer_prompt(p, Mode.ASYNCTHINK) == base + "You may fork workers.\n"
    assert task.worker_prompt("Fill row 1.") == "Worker. Fill row 1.\n"
