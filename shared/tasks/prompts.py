"""Prompt pieces shared by every task: the per-mode hint and the worker wrapper.

Prompts are short plain text on purpose: a ~10 M-parameter model is trained on them from scratch, so
every fixed word costs context and teaches nothing. Tasks keep their own templates beside them.
"""

from __future__ import annotations

from shared.tasks.base import Mode

ASYNCTHINK_HINT = "You may fork workers.\n"  # the one line that tells the organizer it may Fork/Join
WORKER_TEMPLATE = "Worker. {query}\n"  # what a worker sees: only its sub-query


def mode_hint(mode: Mode) -> str:
    """The line appended to an organizer prompt: a fork hint for AsyncThink, nothing otherwise."""
    return ASYNCTHINK_HINT if Mode(mode) is Mode.ASYNCTHINK else ""


def worker_prompt(query: str) -> str:
    return WORKER_TEMPLATE.format(query=query.strip())
