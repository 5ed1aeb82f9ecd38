"""Prompts: the short trained form every task uses, and the protocol-teaching form for other models.

Two prompt styles (:class:`PromptStyle`), chosen per model (the backend's ``prompt_style``):

* ``trained``: the task's own short plain-text prompts (``Countdown. Numbers: ...``, a one-line fork
  hint, ``Worker. <query>``). The shipped models were trained from scratch on exactly these: every fixed
  word costs context and teaches nothing, so they stay short.
* ``protocol``: for a model that never saw the protocol (any instruction-tuned model behind SGLang or an
  OpenAI-compatible server): a system message that teaches Fork/Join (prompted AsyncThink, the paper's
  in-context baseline), the problem as the user's message, all in the model's own chat template
  (``backend.format_chat``); workers get a system message that asks for ``<RETURN>...</RETURN>``.
  :func:`for_model` wraps a task so that its prompts take this form; scoring is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from shared.tasks.base import Mode, Problem, Score, Task

ASYNCTHINK_HINT = "You may fork workers.\n"  # the one line that tells the organizer it may Fork/Join
WORKER_TEMPLATE = "Worker. {query}\n"  # what a worker sees: only its sub-query


class PromptStyle(StrEnum):
    TRAINED = "trained"  # the tasks' short prompts, which the shipped models were trained on
    PROTOCOL = "protocol"  # a system message that teaches the protocol, in the model's chat template


def mode_hint(mode: Mode) -> str:
    """The line appended to an organizer prompt: a fork hint for AsyncThink, nothing otherwise."""
    return ASYNCTHINK_HINT if Mode(mode) is Mode.ASYNCTHINK else ""


def worker_prompt(query: str) -> str:
    return WORKER_TEMPLATE.format(query=query.strip())


# ----------------------------------------------------------------------------- the protocol style
# What goes inside <ANSWER> for each graded task; anything else answers in free text.
ANSWER_FORMATS = {
    "countdown": "the distinct expressions you found, separated by ';' (each uses at least two of the "
    "numbers, each number at most once, with + - * / and parentheses)",
    "sudoku": "the 16 digits of the solved grid, row by row",
    "math": "only the final answer (a number or a short expression)",
}

ORGANIZER_SYSTEM = """You are the organizer of a team of workers. Think step by step in plain text. \
You can hand independent sub-problems to workers while you keep thinking:

- <FORK-1>a self-contained sub-question</FORK-1> starts worker 1 at once. A worker sees only that text, \
not this conversation, so include every number and fact it needs. Number forks 1, 2, 3, ... and never \
reuse a number.
- <JOIN-1> waits for worker 1. Its answer then appears after the tag, followed by </JOIN-1>; never \
write that part yourself.
- At most {workers} worker(s) may be running (forked and not yet joined) at any time.
- Join every worker whose answer you need, then finish with <ANSWER>{answer}</ANSWER>. Write nothing \
after </ANSWER>.

Example: <FORK-1>What is 17*20?</FORK-1><FORK-2>What is 17*3?</FORK-2>17*23 = 17*20 + 17*3.\
<JOIN-1>340</JOIN-1><JOIN-2>51</JOIN-2>340 + 51 = 391.<ANSWER>391</ANSWER>"""

SEQUENTIAL_SYSTEM = """Think step by step in plain text, then finish with <ANSWER>{answer}</ANSWER>. \
Write nothing after </ANSWER>."""

WORKER_SYSTEM = """You are a worker. Solve the request below on your own, briefly, then finish with \
<RETURN>your result</RETURN>. Write nothing after </RETURN>."""


def plain_chat(messages: list[dict[str, str]]) -> str:
    """A chat as plain text, for models without a chat template: ``Role: text`` lines, then ``Assistant:``."""
    lines = [f"{m['role'].capitalize()}: {m['content'].strip()}" for m in messages]
    return "\n\n".join(lines) + "\n\nAssistant: "


def conversation(task: Task, problem: Problem) -> list[dict[str, str]]:
    """The problem as chat messages: a chat's own conversation, or the task's statement as one user turn."""
    messages = problem.payload.get("messages") if problem.task == "chat" else None
    if isinstance(messages, list):
        return [dict(m) for m in messages]
    return [{"role": "user", "content": task.organizer_prompt(problem, Mode.SEQUENTIAL).strip()}]


@dataclass
class ProtocolPrompted:
    """A task whose prompts teach the protocol (the ``protocol`` style); everything else is the task's."""

    task: Task
    format_chat: Callable[[list[dict[str, str]]], str]  # messages -> prompt text (the model's template)
    capacity: int
    name: str = field(init=False)
    default_capacity: int = field(init=False)

    def __post_init__(self) -> None:
        self.name = self.task.name
        self.default_capacity = self.task.default_capacity

    def organizer_prompt(self, problem: Problem, mode: Mode) -> str:
        answer = ANSWER_FORMATS.get(self.task.name, "your answer")
        if Mode(mode) is Mode.ASYNCTHINK:
            system = ORGANIZER_SYSTEM.format(workers=max(self.capacity - 1, 1), answer=answer)
        else:
            system = SEQUENTIAL_SYSTEM.format(answer=answer)
        messages = conversation(self.task, problem)
        own = [m["content"] for m in messages if m["role"] in ("system", "developer")]
        turns = [m for m in messages if m["role"] not in ("system", "developer")]
        return self.format_chat([{"role": "system", "content": "\n\n".join([system, *own])}, *turns])

    def worker_prompt(self, query: str) -> str:
        return self.format_chat([{"role": "system", "content": WORKER_SYSTEM}, {"role": "user", "content": query}])

    def problem_from_payload(self, payload: dict[str, Any], problem_id: str | None = None) -> Problem:
        return self.task.problem_from_payload(payload, problem_id)

    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        return self.task.problems(split, n, seed)

    def score(self, problem: Problem, answer: str | None) -> Score | None:
        return self.task.score(problem, answer)

    def aggregate(self, answers: list[str | None]) -> str | None:
        return self.task.aggregate(answers)


def for_model(task: Task, backend: Any, capacity: int) -> Task:
    """``task`` as the backend's model should be prompted: unchanged for ``trained``, else wrapped."""
    if backend.prompt_style is PromptStyle.PROTOCOL:
        return ProtocolPrompted(task, backend.format_chat, capacity)
    return task
