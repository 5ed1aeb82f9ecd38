"""4×4 Sudoku (2×2 boxes): generator of unique-solution puzzles, verifier, vote and prompts.

A puzzle is 16 characters, row by row: digits 1-4 for givens, ``.`` (or ``0`` on input) for blanks.
An answer is the 16 digits of the filled grid; whitespace and the separators ``| , ; / - + _ :`` may
appear anywhere, any other character makes it malformed. It is correct iff it is a valid Sudoku (each
row, column and box holds 1-4 once) that keeps every given — any valid completion counts, so a user
puzzle with several solutions is still scored fairly.

Generation: a random full grid (backtracking with shuffled candidates), then cells are blanked in a
random order, each kept blank only if the solution stays unique; the result is a minimal puzzle
(typically 4-6 givens). Deterministic in the seed; the test split is ``generate(100, TEST_SEED)`` with
ids ``sd-test-<k>`` and is rebuilt on demand (well under a second) rather than stored.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from shared.tasks.base import Mode, Problem, Score, is_problem_file, load_problem_file
from shared.tasks.prompts import mode_hint, worker_prompt

NAME = "sudoku"
SIZE = 4
CELLS = SIZE * SIZE
DIGITS = "1234"
MAX_PUZZLE_CHARS = 64  # user payloads: 16 cells with separators; longer strings are refused unread
TEST_SEED = 26658  # seeds the held-out split
TEST_SIZE = 100

ORGANIZER_TEMPLATE = "Sudoku 4x4. Rows: {rows}\nFill each . so every row, column and 2x2 box has 1-4.\n"

_SEPARATORS = re.compile(r"[\s|,;/\-+_:]+")


def _peers(i: int) -> frozenset[int]:
    r, c = divmod(i, SIZE)
    box = (r // 2, c // 2)
    return frozenset(
        j
        for j in range(CELLS)
        if j != i and (j // SIZE == r or j % SIZE == c or ((j // SIZE) // 2, (j % SIZE) // 2) == box)
    )


PEERS = tuple(_peers(i) for i in range(CELLS))


# ---------------------------------------------------------------- grids


def parse_grid(text: str) -> list[int]:
    """16 cells (0 = blank) from a puzzle string; ValueError saying what is wrong."""
    cells = [c for c in text if not c.isspace()]
    if len(cells) != CELLS:
        raise ValueError(f"a 4x4 Sudoku needs 16 cells, got {len(cells)}")
    bad = [c for c in cells if c not in DIGITS + ".0"]
    if bad:
        raise ValueError(f"cells must be 1-4, '.' or '0'; found {bad[0]!r}")
    return [0 if c in ".0" else int(c) for c in cells]


def grid_text(cells: list[int]) -> str:
    return "".join(str(v) if v else "." for v in cells)


def candidates(cells: list[int], i: int) -> list[int]:
    used = {cells[j] for j in PEERS[i]}
    return [d for d in range(1, SIZE + 1) if d not in used]


def is_consistent(cells: list[int]) -> bool:
    """No filled cell repeats a digit among its peers."""
    return all(not v or all(cells[j] != v for j in PEERS[i]) for i, v in enumerate(cells))


def count_solutions(cells: list[int], limit: int = 2) -> int:
    """Number of completions, counting up to ``limit`` (enough to decide uniqueness)."""
    if not is_consistent(cells):
        return 0
    return _count(list(cells), limit)


def _count(cells: list[int], limit: int) -> int:
    blanks = [i for i, v in enumerate(cells) if not v]
    if not blanks:
        return 1
    i = min(blanks, key=lambda k: len(candidates(cells, k)))
    total = 0
    for d in candidates(cells, i):
        cells[i] = d
        total += _count(cells, limit - total)
        cells[i] = 0
        if total >= limit:
            break
    return total


def solve(cells: list[int]) -> list[int] | None:
    """The first completion found (the only one for a generated puzzle), or None."""
    if not is_consistent(cells):
        return None
    return _fill(list(cells), None)


def _fill(cells: list[int], rng: random.Random | None) -> list[int] | None:
    blanks = [i for i, v in enumerate(cells) if not v]
    if not blanks:
        return cells
    i = min(blanks, key=lambda k: len(candidates(cells, k)))
    options = candidates(cells, i)
    if rng is not None:
        rng.shuffle(options)
    for d in options:
        cells[i] = d
        if _fill(cells, rng) is not None:
            return cells
        cells[i] = 0
    return None


def make_puzzle(rng: random.Random) -> tuple[str, str]:
    """A minimal unique-solution puzzle and its solution, as 16-character strings."""
    solution = _fill([0] * CELLS, rng)
    assert solution is not None  # an empty 4x4 grid always has a completion
    puzzle = list(solution)
    order = list(range(CELLS))
    rng.shuffle(order)
    for i in order:
        given, puzzle[i] = puzzle[i], 0
        if _count(list(puzzle), 2) != 1:
            puzzle[i] = given
    return grid_text(puzzle), grid_text(solution)


def generate(n: int, seed: int, exclude: Iterable[str] = (), id_prefix: str | None = None) -> list[Problem]:
    """``n`` distinct unique-solution puzzles from ``seed``, none of them in ``exclude``."""
    rng = random.Random(seed)
    prefix = id_prefix if id_prefix is not None else f"sd-{seed}"
    seen = set(exclude)
    out: list[Problem] = []
    for _ in range(100 * n + 100):
        if len(out) >= n:
            break
        puzzle, solution = make_puzzle(rng)
        if puzzle in seen:
            continue
        seen.add(puzzle)
        out.append(
            Problem(task=NAME, id=f"{prefix}-{len(out)}", payload={"puzzle": puzzle}, reference=solution)
        )
    if len(out) < n:
        raise RuntimeError(f"only {len(out)} distinct puzzles found for n={n}; ask for fewer")
    return out


@lru_cache(maxsize=1)
def load_test_split() -> tuple[Problem, ...]:
    return tuple(generate(TEST_SIZE, TEST_SEED, id_prefix="sd-test"))


# ---------------------------------------------------------------- answers


def normalize_answer(answer: str) -> str:
    """The 16 digits of an answer, separators removed; ValueError if it is not 16 digits 1-4."""
    digits = _SEPARATORS.sub("", answer)
    if len(digits) != CELLS or any(c not in DIGITS for c in digits):
        raise ValueError(f"expected 16 digits 1-4 (separators allowed), got {answer.strip()[:40]!r}")
    return digits


def check_answer(puzzle: str, answer: str) -> str:
    """The normalized grid if ``answer`` solves ``puzzle``; ValueError saying why not otherwise."""
    digits = normalize_answer(answer)
    cells = [int(c) for c in digits]
    givens = parse_grid(puzzle)
    clash = next((i for i, g in enumerate(givens) if g and g != cells[i]), None)
    if clash is not None:
        raise ValueError(f"cell {clash} (row {clash // SIZE + 1}) changes the given {givens[clash]}")
    if not is_consistent(cells):
        raise ValueError("a row, column or box repeats a digit")
    return digits


class SudokuTask:
    """4×4 Sudoku, zero-shot in the paper (capacity c = 2)."""

    name = NAME
    default_capacity = 2

    def problem_from_payload(self, payload: dict[str, Any], problem_id: str | None = None) -> Problem:
        """Validate ``{"puzzle": "1.3....2..4.2..."}``: 16 cells, givens consistent, solvable."""
        if not isinstance(payload, dict) or not isinstance(payload.get("puzzle"), str):
            raise ValueError("sudoku payload must be an object with a 'puzzle' string of 16 cells")
        if len(payload["puzzle"]) > MAX_PUZZLE_CHARS:
            raise ValueError(f"the sudoku 'puzzle' is {len(payload['puzzle'])} characters; at most {MAX_PUZZLE_CHARS}")
        cells = parse_grid(payload["puzzle"])
        solution = solve(cells)
        if solution is None:
            raise ValueError("the puzzle has no solution (a given repeats, or the givens conflict)")
        puzzle = grid_text(cells)
        unique = _count(list(cells), 2) == 1
        return Problem(
            task=NAME,
            id=problem_id or f"sd-{puzzle.replace('.', '0')}",
            payload={"puzzle": puzzle},
            reference=grid_text(solution) if unique else None,
        )

    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        """Split "test": the first ``n`` of the fixed 100; "train": ``n`` fresh puzzles, none from test;
        a JSONL file's path: its first ``n`` puzzles (one ``{"puzzle": ...}`` payload a line)."""
        if split == "test":
            if n > TEST_SIZE:
                raise ValueError(f"the sudoku test split has {TEST_SIZE} problems; asked for {n}")
            return list(load_test_split()[:n])
        if split == "train":
            return generate(n, seed, exclude=(p.payload["puzzle"] for p in load_test_split()))
        if is_problem_file(split):
            pool = load_problem_file(self, split)
            if n > len(pool):
                raise ValueError(f"the sudoku split {split!r} has {len(pool)} problems; asked for {n}")
            return pool[:n]
        raise ValueError(f"unknown sudoku split {split!r}; use train, test or a JSONL path")

    def organizer_prompt(self, problem: Problem, mode: Mode) -> str:
        puzzle = problem.payload["puzzle"]
        rows = " ".join(puzzle[r * SIZE : (r + 1) * SIZE] for r in range(SIZE))
        return ORGANIZER_TEMPLATE.format(rows=rows) + mode_hint(mode)

    def worker_prompt(self, query: str) -> str:
        return worker_prompt(query)

    def score(self, problem: Problem, answer: str | None) -> Score:
        if answer is None:
            return Score(accuracy=0.0, details={"error": "no answer"})
        try:
            grid = check_answer(problem.payload["puzzle"], answer)
        except ValueError as err:
            return Score(accuracy=0.0, details={"error": str(err)})
        return Score(accuracy=1.0, correct=1, details={"grid": grid})

    def aggregate(self, answers: list[str | None], problem: Problem | None = None) -> str | None:
        """Majority vote over well-formed answers (correct ones only, when ``problem`` is given)."""
        votes: Counter[str] = Counter()
        for answer in answers:
            if not answer:
                continue
            try:
                grid = (
                    check_answer(problem.payload["puzzle"], answer) if problem else normalize_answer(answer)
                )
            except ValueError:
                continue
            votes[grid] += 1
        return votes.most_common(1)[0][0] if votes else None
