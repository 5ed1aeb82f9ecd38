"""Math word problems (AIME-24, AMC-23, or any JSONL file): loader, math-verify scoring, vote, prompts.

Data: one JSON object per line with ``id``, ``problem`` and ``answer`` (other keys are ignored). The
two paper sets are bundled in ``data/math/`` (copied from the project's shared data folder).

Scoring: the answer text (inside ``<ANSWER>``; a ``\\boxed{}`` is fine) and the reference are parsed
with math-verify and compared with ``verify``. math-verify's own timeouts use ``signal.alarm``, which
only works in the main thread; elsewhere (worker threads, executors) they are switched off and the
input is capped at ``MAX_ANSWER_CHARS`` characters instead, so one pathological answer cannot hang a
scorer for long. Nothing here is a sandbox: math-verify runs sympy on the text.
"""

from __future__ import annotations

import hashlib
import json
import threading
from functools import lru_cache
from math import isfinite
from pathlib import Path
from typing import Any

from math_verify import parse, verify

from shared.tasks.base import Mode, Problem, Score
from shared.tasks.prompts import mode_hint, worker_prompt

NAME = "math"
DATA_DIR = Path(__file__).parent / "data" / "math"
BUNDLED = {"aime24": DATA_DIR / "aime24.jsonl", "amc23": DATA_DIR / "amc23.jsonl"}
TEST_SPLITS = ("aime24", "amc23")  # what split "test" means: both, in this order
MAX_ANSWER_CHARS = 1000  # longer answers are cut before parsing
MAX_PROBLEM_CHARS = 8_000  # user payloads: a problem statement (AIME's longest is under 1,000)
MAX_REFERENCE_CHARS = 256  # user payloads: the reference answer
MAIN_THREAD_TIMEOUT_S = 5  # math-verify timeout per parse/verify, main thread only

ORGANIZER_TEMPLATE = "Math. {problem}\n"


# ---------------------------------------------------------------- data


def load_jsonl(path: str | Path, task_prefix: str | None = None) -> list[Problem]:
    """Problems from a JSONL file; ValueError naming the file, line and missing or bad field."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such math JSONL file: {path}; use 'aime24', 'amc23' or a file path")
    problems = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            problems.append(_row_to_problem(line, f"{path}:{lineno}"))
    return problems


def _row_to_problem(line: str, where: str) -> Problem:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg})") from err
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object with 'id', 'problem' and 'answer'")
    for key in ("id", "problem", "answer"):
        if key not in row:
            raise ValueError(f"{where}: missing {key!r} (each line needs 'id', 'problem' and 'answer')")
        if not isinstance(row[key], str | int | float) or isinstance(row[key], bool) or str(row[key]) == "":
            raise ValueError(f"{where}: {key!r} must be a non-empty string or number, got {row[key]!r}")
    answer = str(row["answer"])
    payload = {"problem": str(row["problem"]), "answer": answer}
    return Problem(task=NAME, id=str(row["id"]), payload=payload, reference=answer)


# ---------------------------------------------------------------- verification


def _timeout() -> int | None:
    return MAIN_THREAD_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def parse_answer(text: str) -> list[Any]:
    """math-verify's parse of an answer (``\\boxed{}`` or plain); [] when nothing is recognised."""
    return list(parse(text[:MAX_ANSWER_CHARS], parsing_timeout=_timeout()))  # type: ignore[arg-type]


@lru_cache(maxsize=4096)
def parse_reference(answer: str) -> tuple[Any, ...]:
    """The reference answer parsed as LaTeX math (cached: references repeat across rollouts)."""
    text = answer if "$" in answer or "\\boxed" in answer else f"${answer}$"
    return tuple(parse_answer(text))


def equivalent(gold: list[Any], pred: list[Any]) -> bool:
    """math-verify equivalence of two parsed answers; False when either is empty."""
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=_timeout()))


def normalize(text: str) -> str:
    return "".join(text.split()).strip("$.").lower()


# ---------------------------------------------------------------- the task


class MathTask:
    """AIME-24 / AMC-23 style problems with one final answer (paper capacity c = 4)."""

    name = NAME
    default_capacity = 4

    def problem_from_payload(self, payload: dict[str, Any], problem_id: str | None = None) -> Problem:
        """Validate ``{"problem": str, "answer": str (optional)}``; without an answer scores are 0."""
        if (
            not isinstance(payload, dict)
            or not isinstance(payload.get("problem"), str)
            or not payload["problem"].strip()
        ):
            raise ValueError("math payload must be an object with a non-empty 'problem' string")
        if len(payload["problem"]) > MAX_PROBLEM_CHARS:
            raise ValueError(f"the math 'problem' is {len(payload['problem'])} characters; at most {MAX_PROBLEM_CHARS}")
        answer = payload.get("answer")
        if answer is not None and (isinstance(answer, bool) or not isinstance(answer, str | int | float)):
            raise ValueError(f"math 'answer' must be a string or number, got {type(answer).__name__}")
        if isinstance(answer, float) and not isfinite(answer):
            raise ValueError("math 'answer' must be a finite number")
        if answer is not None and len(str(answer)) > MAX_REFERENCE_CHARS:
            raise ValueError(f"math 'answer' is longer than {MAX_REFERENCE_CHARS} characters")
        ref = None if answer is None else str(answer)
        pid = problem_id or "math-" + hashlib.sha1(payload["problem"].encode()).hexdigest()[:10]
        body: dict[str, Any] = {"problem": payload["problem"], "answer": ref}
        return Problem(task=NAME, id=pid, payload=body, reference=ref)

    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        """``split``: "aime24", "amc23", "test" (both) or a JSONL path; the first ``n`` problems."""
        if split == "test":
            pool = [p for name in TEST_SPLITS for p in load_jsonl(BUNDLED[name])]
        elif split in BUNDLED:
            pool = load_jsonl(BUNDLED[split])
        elif split == "train":
            raise ValueError("no math train split is bundled; pass the path of a JSONL file instead")
        else:
            pool = load_jsonl(split)
        if n > len(pool):
            raise ValueError(f"math split {split!r} has {len(pool)} problems; asked for {n}")
        return pool[:n]

    def organizer_prompt(self, problem: Problem, mode: Mode) -> str:
        return ORGANIZER_TEMPLATE.format(problem=problem.payload["problem"].strip()) + mode_hint(mode)

    def worker_prompt(self, query: str) -> str:
        return worker_prompt(query)

    def score(self, problem: Problem, answer: str | None) -> Score:
        reference = problem.reference if problem.reference is not None else problem.payload.get("answer")
        if reference is None:
            return Score(accuracy=0.0, details={"error": "the problem has no reference answer"})
        if answer is None or not answer.strip():
            return Score(accuracy=0.0, details={"error": "no answer"})
        pred = parse_answer(answer)
        if not pred:
            return Score(accuracy=0.0, details={"error": "no math found in the answer"})
        ok = equivalent(list(parse_reference(str(reference))), pred)
        return Score(accuracy=float(ok), correct=int(ok), details={"parsed": str(pred[-1])})

    def aggregate(self, answers: list[str | None], problem: Problem | None = None) -> str | None:
        """Majority vote: answers grouped by math-verify equivalence (normalized text if unparsable)."""
        groups: list[tuple[list[Any], str, str]] = []  # (parsed, first text, normalized text)
        counts: list[int] = []
        for answer in answers:
            if not answer or not answer.strip():
                continue
            parsed, norm = parse_answer(answer), normalize(answer)
            for k, (g_parsed, _, g_norm) in enumerate(groups):
                if (parsed and equivalent(g_parsed, parsed)) or (
                    not parsed and not g_parsed and norm == g_norm
                ):
                    counts[k] += 1
                    break
            else:
                groups.append((parsed, answer, norm))
                counts.append(1)
        if not groups:
            return None
        best = max(range(len(groups)), key=lambda k: (counts[k], -k))
        return groups[best][1]
