"""The task interface: problems, prompts, verification and aggregation.

Every task splits verification into extract -> evaluate -> score (nanochat's ``tasks/``): ``score``
takes the raw text inside ``<ANSWER>`` and returns a :class:`Score` whose ``accuracy`` is the reward
``R_A`` of the reward (:mod:`shared.rewards`; ``None``: the task has no grader, as free-form chat).
Prompts for the organizer (per mode) and for workers live beside each task.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol


class Mode(StrEnum):
    ASYNCTHINK = "asyncthink"  # organizer with Fork/Join
    SEQUENTIAL = "sequential"  # one trace, no forks
    PARALLEL = "parallel"  # k independent sequential traces, aggregated by vote


@dataclass(frozen=True)
class Problem:
    task: str  # "countdown", "sudoku", "math"
    id: str  # stable id, unique within the task
    payload: dict[str, Any]  # task-specific fields (JSON-serialisable)
    reference: Any = None  # the known answer where there is one (math), else None


@dataclass(frozen=True)
class Score:
    accuracy: float  # R_A in [0, 1]
    correct: int = 0  # how many parts were right (countdown: distinct correct solutions)
    needed: int = 1  # how many parts a full answer has (countdown: n_s)
    details: dict[str, Any] = field(default_factory=dict)


class Task(Protocol):
    name: str
    default_capacity: int  # the paper's c for this task

    def problem_from_payload(self, payload: dict[str, Any], problem_id: str | None = None) -> Problem:
        """Validate user input (REST, CLI); raise ValueError with a message that says what is wrong."""
        ...

    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        """``split`` is "train" (generated from ``seed``) or "test" (the fixed held-out split)."""
        ...

    def organizer_prompt(self, problem: Problem, mode: Mode) -> str: ...

    def worker_prompt(self, query: str) -> str:
        """What a worker sees: only its sub-query, wrapped in the task's worker instructions."""
        ...

    def score(self, problem: Problem, answer: str | None) -> Score | None:
        """The answer's score; None for a task with no grader (free-form chat)."""
        ...

    def aggregate(self, answers: list[str | None]) -> str | None:
        """Combine the answers of k parallel traces (majority vote, or top-n distinct for countdown)."""
        ...


# ---------------------------------------------------------------------------------------- problem files
def is_problem_file(split: str) -> bool:
    """Whether a ``split`` argument names a file (a ``.jsonl`` name or an existing path), not a split."""
    return split.endswith(".jsonl") or Path(split).is_file()


def read_problem_rows(path: str | Path) -> list[tuple[str | None, dict[str, Any]]]:
    """``(id or None, payload)`` per non-empty line of a JSONL problem file.

    A line is the task's payload with an optional ``id`` (``{"id": "p1", "numbers": [...], ...}``), or
    ``{"id": ..., "payload": {...}}`` (what GRPO caches). FileNotFoundError, or ValueError with the line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no problem file {path}")
    rows: list[tuple[str | None, dict[str, Any]]] = []
    for k, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{k}: not JSON: {exc}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{k}: expected a JSON object")
        payload = row["payload"] if isinstance(row.get("payload"), dict) else row
        pid = row.get("id")
        rows.append((str(pid) if pid is not None else None, payload))
    return rows


def load_problem_file(task: Task, path: str | Path) -> list[Problem]:
    """Every problem of a JSONL file, validated by ``task.problem_from_payload``; a row without an id
    gets ``<file stem>-<k>`` (k counts problems from 0). ValueError names the bad problem."""
    out = []
    for k, (pid, payload) in enumerate(read_problem_rows(path)):
        try:
            out.append(task.problem_from_payload(payload, pid or f"{Path(path).stem}-{k}"))
        except ValueError as exc:
            raise ValueError(f"{path}: problem {k + 1}: {exc}") from None
    if not out:
        raise ValueError(f"{path} holds no problems")
    return out
