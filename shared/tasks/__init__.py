"""Tasks: multi-solution countdown, 4x4 Sudoku and math (AIME/AMC)."""

from __future__ import annotations

from shared.tasks.base import Mode, Problem, Score, Task

__all__ = ["Mode", "Problem", "Score", "Task", "get_task", "TASK_NAMES"]

TASK_NAMES = ("countdown", "sudoku", "math")


def get_task(name: str) -> Task:
    """The task called ``name``; ValueError naming the known tasks otherwise."""
    if name == "countdown":
        from shared.tasks.countdown import CountdownTask

        return CountdownTask()
    if name == "sudoku":
        from shared.tasks.sudoku import SudokuTask

        return SudokuTask()
    if name == "math":
        from shared.tasks.math import MathTask

        return MathTask()
    raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(TASK_NAMES)}")
