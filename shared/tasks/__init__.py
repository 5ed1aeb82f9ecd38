"""Tasks: multi-solution countdown, 4x4 Sudoku, math (AIME/AMC), and free-form chat (no grader)."""

from __future__ import annotations

from shared.tasks.base import Mode, Problem, Score, Task

__all__ = ["Mode", "Problem", "Score", "Task", "get_task", "TASK_NAMES"]

TASK_NAMES = ("countdown", "sudoku", "math", "chat")


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
    if name == "chat":
        from shared.tasks.chat import ChatTask

        return ChatTask()
    raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(TASK_NAMES)}")
