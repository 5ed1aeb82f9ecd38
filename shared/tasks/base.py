"""The task interface: problems, prompts, verification and aggregation.

Every task splits verification into extract -> evaluate -> score (nanochat's ``tasks/``): ``score``
takes the raw text inside ``<ANSWER>`` and returns a :class:`Score` whose ``accuracy`` is the reward
``R_A`` of the reward (``None``: the task has no grader, as free-form chat). Prompts for the organizer (per mode) and for workers live beside each task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
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
