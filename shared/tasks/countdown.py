"""Multi-solution countdown (MCD): generator, fixed test split, verifier, vote and prompts.

A problem gives numbers and a target; a full answer lists ``n_solutions`` (default 4) expressions with
+ − × ÷ and parentheses, each evaluating exactly to the target and using **at least two** of the given
numbers, each at most once (as often as it is given). A bare number is never a solution, not even when
it equals the target. Solutions count only when distinct in the strict sense of
:mod:`shared.tasks.expr` (padding such as ``×(5−4)`` or ``+a−a`` is no new solution; an added term worth
1 built differently is), so padding one solution into four earns nothing. The generator, the verifier,
the reward, the teacher and every reported metric use these same rules.

Answer format (the text inside ``<ANSWER>``): expressions separated by ``;`` or newlines; each may end
with ``= target`` and may start with a list bullet (``-``, ``*``, ``1.``, ``1)``). Every listed
expression is checked; accuracy is ``min(distinct valid, n_s) / n_s``.

Generation: numbers are drawn uniformly from [low, high] (repeats allowed) until some target in
[target_low, target_high] has at least ``n_solutions`` distinct solutions; the target is then drawn
uniformly from those targets. (Most 4-number draws have no such target, so this is cheaper than
drawing numbers and target together, at the cost of slightly favouring number sets with few good
targets.) About 0.3 s per problem on one core.

Held-out splits (rebuild both with ``python -m shared.tasks.countdown``):

* ``test``: ``data/countdown_test.jsonl``, 400 problems made by ``generate(400, TEST_SEED)`` with ids
  ``cd-test-<k>``: the fixed split every model card reports;
* ``test2``: ``data/countdown_test2.jsonl``, 400 problems drawn the same way from another seed
  (``TEST2_SEED``, ids ``cd-test2-<k>``), none of them in ``test``: a second check that a result is not
  an accident of one draw.

Train problems never repeat a held-out problem (same numbers as a multiset and same target);
``build_train_problems`` rebuilds the committed ``trainer/data/countdown_train_problems.jsonl``. Any
JSONL file of problems (one payload a line, an optional ``id``) is a split too: pass its path.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from shared.tasks.base import Mode, Problem, Score, is_problem_file, load_problem_file
from shared.tasks.countdown_solver import solution_counts
from shared.tasks.expr import Canonical, ExprError, canonical, check_solution
from shared.tasks.prompts import mode_hint, worker_prompt

NAME = "countdown"
TEST_SEED = 26658  # the paper's arXiv number; seeds the committed test split
TEST_SIZE = 400
TEST_FILE = Path(__file__).parent / "data" / "countdown_test.jsonl"
TEST2_SEED = 51026  # the second held-out split: same draw, another seed
TEST2_FILE = Path(__file__).parent / "data" / "countdown_test2.jsonl"
TRAIN_SEEDS = tuple(range(101, 107))  # the committed train problems: 2500 from each seed, deduplicated
TRAIN_PER_SEED = 2500
DEFAULT_N_SOLUTIONS = 4
MAX_NUMBERS = 8  # user payloads: verification is cheap, but keep prompts sane
# Payload bounds (user payloads; the generated splits use 1..99 and targets 10..100)
MIN_NUMBER, MAX_NUMBER = 1, 10_000
MIN_TARGET, MAX_TARGET = 1, 1_000_000
MAX_SOLUTIONS = 16

ORGANIZER_TEMPLATE = "Countdown. Numbers: {numbers}. Target: {target}. Find {n} distinct solutions.\n"

_SPLIT = re.compile(r"[;\n]+")
_BULLET = re.compile(r"^(?:[-*\u2022]|\d+[.)])\s+")


# ---------------------------------------------------------------- problems


def problem_key(numbers: Sequence[int], target: int) -> tuple[tuple[int, ...], int]:
    """Identity of a problem for de-duplication: the numbers as a multiset and the target."""
    return tuple(sorted(numbers)), target


def make_problem(numbers: Sequence[int], target: int, n_solutions: int, problem_id: str) -> Problem:
    payload = {"numbers": list(numbers), "target": target, "n_solutions": n_solutions}
    return Problem(task=NAME, id=problem_id, payload=payload)


def generate(
    n: int,
    seed: int,
    n_numbers: int = 4,
    low: int = 1,
    high: int = 99,
    target_low: int = 10,
    target_high: int = 100,
    n_solutions: int = DEFAULT_N_SOLUTIONS,
    exclude: Iterable[tuple[tuple[int, ...], int]] = (),
    id_prefix: str | None = None,
    max_draws: int = 100_000,
) -> list[Problem]:
    """``n`` problems, each with at least ``n_solutions`` distinct solutions (checked by the solver).

    Deterministic in ``seed``. ``exclude`` holds :func:`problem_key` values never to return (e.g. the
    test split); duplicates within one call are skipped too. Ids are ``<id_prefix>-<k>``, by default
    ``cd-<seed>-<k>``. RuntimeError if ``max_draws`` number draws are not enough.
    """
    if n_numbers < 1 or low > high or target_low > target_high or n_solutions < 1:
        raise ValueError("need n_numbers >= 1, low <= high, target_low <= target_high, n_solutions >= 1")
    rng = random.Random(seed)
    prefix = id_prefix if id_prefix is not None else f"cd-{seed}"
    seen = set(exclude)
    out: list[Problem] = []
    for _ in range(max_draws):
        if len(out) >= n:
            return out
        numbers = [rng.randint(low, high) for _ in range(n_numbers)]
        counts = solution_counts(numbers, target_low, target_high)
        good = [t for t, c in counts.items() if c >= n_solutions and problem_key(numbers, t) not in seen]
        if not good:
            continue
        target = rng.choice(good)
        seen.add(problem_key(numbers, target))
        out.append(make_problem(numbers, target, n_solutions, f"{prefix}-{len(out)}"))
    if len(out) >= n:
        return out
    raise RuntimeError(
        f"found only {len(out)} of {n} problems in {max_draws} draws; widen the number or target "
        f"range, lower n_solutions or raise max_draws"
    )


def build_test_split() -> list[Problem]:
    """The held-out split exactly as committed in ``data/countdown_test.jsonl``."""
    return generate(TEST_SIZE, TEST_SEED, id_prefix="cd-test")


def build_test2_split() -> list[Problem]:
    """The second held-out split (``data/countdown_test2.jsonl``): another seed, none of ``test``."""
    return generate(TEST_SIZE, TEST2_SEED, id_prefix="cd-test2", exclude=_keys(build_test_split()))


def held_out_keys() -> set[tuple[tuple[int, ...], int]]:
    """The :func:`problem_key` of every problem of both committed held-out splits."""
    return _keys(load_test_split()) | _keys(load_test2_split())


def _keys(problems: Iterable[Problem]) -> set[tuple[tuple[int, ...], int]]:
    return {problem_key(p.payload["numbers"], p.payload["target"]) for p in problems}


def build_train_problems(
    seeds: Sequence[int] = TRAIN_SEEDS, per_seed: int = TRAIN_PER_SEED
) -> list[Problem]:
    """``per_seed`` train problems from each seed, none held out, duplicates across seeds removed."""
    exclude = held_out_keys()
    out: list[Problem] = []
    seen: set[tuple[tuple[int, ...], int]] = set()
    for seed in seeds:
        for p in generate(per_seed, seed, exclude=exclude):
            key = problem_key(p.payload["numbers"], p.payload["target"])
            if key not in seen:
                seen.add(key)
                out.append(p)
    return out


def write_jsonl(problems: Iterable[Problem], path: Path, with_ids: bool = True) -> None:
    with path.open("w", encoding="utf-8") as f:
        for p in problems:
            row = {"id": p.id, **p.payload} if with_ids else dict(p.payload)
            f.write(json.dumps(row) + "\n")


def load_split_file(path: str | Path) -> tuple[Problem, ...]:
    """The problems of a JSONL file (:func:`shared.tasks.base.load_problem_file`)."""
    return tuple(load_problem_file(CountdownTask(), path))


@lru_cache(maxsize=1)
def load_test_split() -> tuple[Problem, ...]:
    return load_split_file(TEST_FILE)


@lru_cache(maxsize=1)
def load_test2_split() -> tuple[Problem, ...]:
    return load_split_file(TEST2_FILE)


# ---------------------------------------------------------------- answers


def split_answer(answer: str) -> list[str]:
    """The expressions listed in an answer: split on ``;``/newlines, bullets and ``= target`` removed."""
    parts = []
    for raw in _SPLIT.split(answer):
        sides = [s.strip().rstrip(".,") for s in _BULLET.sub("", raw.strip()).split("=")]
        formulas = [s for s in sides if s and not s.isdigit()]  # "75 = 25+50" as well as "25+50 = 75"
        text = formulas[0] if formulas else sides[0]
        if text:
            parts.append(text)
    return parts


def score_expressions(exprs: Sequence[str], numbers: Sequence[int], target: int, n_solutions: int) -> Score:
    """Score a list of expressions: distinct valid ones among the first ``n_solutions``, over ``n_solutions``.

    Only the first ``n_solutions`` expressions count (the task asks for that many), so listing many
    guesses cannot buy accuracy; the rest are reported as ``ignored``.
    """
    valid: list[str] = []
    invalid: list[dict[str, str]] = []
    duplicate: list[str] = []
    seen: set[Canonical] = set()
    ignored = list(exprs[n_solutions:])
    for text in exprs[:n_solutions]:
        try:
            key = check_solution(text, numbers, target)
        except ExprError as err:
            invalid.append({"expr": text, "reason": str(err)})
            continue
        if key in seen:
            duplicate.append(text)
        else:
            seen.add(key)
            valid.append(text)
    correct = len(valid)
    return Score(
        accuracy=min(correct, n_solutions) / n_solutions,
        correct=correct,
        needed=n_solutions,
        details={"valid": valid, "invalid": invalid, "duplicate": duplicate, "ignored": ignored},
    )


def vote(
    answers: Iterable[str | None], problem: Problem | None = None, n_solutions: int | None = None
) -> str | None:
    """Parallel-thinking vote: the ``n_s`` distinct valid expressions produced by the most traces.

    A trace counts once per canonical form. With ``problem`` an expression must solve it; without, it
    must only parse and evaluate. Ties go to the form seen first. None when nothing qualifies.
    """
    n_s = n_solutions or (problem.payload["n_solutions"] if problem else DEFAULT_N_SOLUTIONS)
    counts: dict[Canonical, int] = {}
    first_text: dict[Canonical, str] = {}
    for answer in answers:
        if not answer:
            continue
        in_trace: set[Canonical] = set()
        for text in split_answer(answer):
            try:
                if problem is not None:
                    key = check_solution(text, problem.payload["numbers"], problem.payload["target"])
                else:
                    key = canonical(text)
            except ExprError:
                continue
            if key not in in_trace:
                in_trace.add(key)
                counts[key] = counts.get(key, 0) + 1
                first_text.setdefault(key, text)
    order = {key: i for i, key in enumerate(first_text)}
    ranked = sorted(counts, key=lambda k: (-counts[k], order[k]))[:n_s]
    return "; ".join(first_text[k] for k in ranked) if ranked else None


def countdown_metrics(scores: Sequence[Score]) -> dict[str, float]:
    """The paper's MCD metrics, in percent: at least 1, 2, 3 distinct correct, and all correct."""
    if not scores:
        return {"at_least_1": 0.0, "at_least_2": 0.0, "at_least_3": 0.0, "all_correct": 0.0}
    total = len(scores)

    def pct(hits: int) -> float:
        return 100.0 * hits / total

    return {
        "at_least_1": pct(sum(s.correct >= 1 for s in scores)),
        "at_least_2": pct(sum(s.correct >= 2 for s in scores)),
        "at_least_3": pct(sum(s.correct >= 3 for s in scores)),
        "all_correct": pct(sum(s.correct >= s.needed for s in scores)),
    }


# ---------------------------------------------------------------- the task


def _short(value: Any) -> str:
    """``repr(value)`` cut to 40 characters, for error messages about user input."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else f"a {len(str(value))}-digit number"
    return text if len(text) <= 40 else text[:40] + "…"


def _int_field(payload: dict[str, Any], name: str, default: int | None = None) -> int:
    value = payload.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"countdown payload field {name!r} must be an integer, got {_short(value)}")
    return value


class CountdownTask:
    """The multi-solution countdown task (paper capacity c = 2)."""

    name = NAME
    default_capacity = 2

    def problem_from_payload(self, payload: dict[str, Any], problem_id: str | None = None) -> Problem:
        """Validate ``{"numbers": [ints], "target": int, "n_solutions": int (default 4)}``."""
        if not isinstance(payload, dict):
            raise ValueError("countdown payload must be an object with 'numbers' and 'target'")
        numbers = payload.get("numbers")
        if not isinstance(numbers, list) or not 1 <= len(numbers) <= MAX_NUMBERS:
            raise ValueError(f"countdown 'numbers' must be a list of 1 to {MAX_NUMBERS} integers")
        for x in numbers:
            if isinstance(x, bool) or not isinstance(x, int):
                raise ValueError(f"countdown 'numbers' must be integers, got {_short(x)}")
            if not MIN_NUMBER <= x <= MAX_NUMBER:
                raise ValueError(f"countdown 'numbers' must be {MIN_NUMBER} to {MAX_NUMBER:_}, got {_short(x)}")
        target = _int_field(payload, "target")
        if not MIN_TARGET <= target <= MAX_TARGET:
            raise ValueError(f"countdown 'target' must be {MIN_TARGET} to {MAX_TARGET:_}, got {_short(target)}")
        n_s = _int_field(payload, "n_solutions", DEFAULT_N_SOLUTIONS)
        if not 1 <= n_s <= MAX_SOLUTIONS:
            raise ValueError(f"countdown 'n_solutions' must be 1 to {MAX_SOLUTIONS}, got {_short(n_s)}")
        if problem_id is None:
            digest = hashlib.sha1(json.dumps([sorted(numbers), target, n_s]).encode()).hexdigest()
            problem_id = f"cd-{digest[:10]}"
        return make_problem(numbers, target, n_s, problem_id)

    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        """The first ``n`` problems of a split: "test" and "test2" (the committed held-out files), a
        JSONL file's path, or "train" (``n`` fresh problems from ``seed``, none held out)."""
        if split == "train":
            return generate(n, seed, exclude=held_out_keys())
        if split in ("test", "test2"):
            pool = load_test_split() if split == "test" else load_test2_split()
        elif is_problem_file(split):
            pool = load_split_file(split)
        else:
            raise ValueError(f"unknown countdown split {split!r}; use train, test, test2 or a JSONL path")
        if n > len(pool):
            raise ValueError(f"the countdown split {split!r} has {len(pool)} problems; asked for {n}")
        return list(pool[:n])

    def organizer_prompt(self, problem: Problem, mode: Mode) -> str:
        p = problem.payload
        numbers = " ".join(str(x) for x in p["numbers"])
        text = ORGANIZER_TEMPLATE.format(numbers=numbers, target=p["target"], n=p["n_solutions"])
        return text + mode_hint(mode)

    def worker_prompt(self, query: str) -> str:
        return worker_prompt(query)

    def score(self, problem: Problem, answer: str | None) -> Score:
        p = problem.payload
        if answer is None:
            return Score(accuracy=0.0, correct=0, needed=p["n_solutions"], details={"error": "no answer"})
        return score_expressions(split_answer(answer), p["numbers"], p["target"], p["n_solutions"])

    def aggregate(self, answers: list[str | None], problem: Problem | None = None) -> str | None:
        """Top ``n_s`` distinct expressions by how many traces gave them (valid ones only with ``problem``)."""
        return vote(answers, problem)


def main(argv: Sequence[str] | None = None) -> None:
    """Rebuild the committed held-out splits (and with ``--train PATH`` the train problems)."""
    import argparse

    parser = argparse.ArgumentParser(description="rebuild the committed countdown problem files")
    parser.add_argument("--train", type=Path, help="also write the train problems to this path")
    args = parser.parse_args(argv)
    TEST_FILE.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(build_test_split(), TEST_FILE)
    load_test_split.cache_clear()
    write_jsonl(build_test2_split(), TEST2_FILE)
    load_test2_split.cache_clear()
    print(f"wrote {TEST_SIZE} problems to {TEST_FILE} and {TEST_SIZE} to {TEST2_FILE}")
    if args.train:
        train = build_train_problems()
        write_jsonl(train, args.train, with_ids=False)
        print(f"wrote {len(train)} train problems to {args.train}")


if __name__ == "__main__":
    main()
