"""A problem and its episode settings from a page's form (the organizer and planning pages share it).

Fields: ``task`` (chat, countdown, math, sudoku) and its statement (``prompt``; ``numbers`` and ``target``;
``problem``; ``puzzle``), then ``capacity``, ``organizer_budget``, ``worker_budget`` and
``worker_timeout_s`` (empty: the defaults). The task's own validation decides; its message is shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from shared.episode import EpisodeSettings
from shared.tasks import get_task
from shared.tasks.base import Problem

TASKS = ("chat", "countdown", "math", "sudoku")
HUMAN_WORKER_TIMEOUT_S = 3600.0  # episodes started from the pages wait this long for a worker (people are slow)


class FormError(ValueError):
    """What is wrong with the form, for the page."""


@dataclass
class ProblemForm:
    task: str = "chat"
    prompt: str = ""
    numbers: str = ""
    target: str = ""
    problem: str = ""
    puzzle: str = ""
    capacity: str = ""
    organizer_budget: str = ""
    worker_budget: str = ""
    worker_timeout_s: str = ""

    @classmethod
    def of(cls, values: dict[str, str]) -> ProblemForm:
        return cls(**{k: values.get(k, "").strip()[:8000] for k in cls.__dataclass_fields__})

    def payload(self) -> dict[str, Any]:
        if self.task == "chat":
            return {"prompt": self.prompt}
        if self.task == "countdown":
            try:
                numbers = [int(x) for x in self.numbers.replace(",", " ").split()]
                target = int(self.target)
            except ValueError as err:
                raise FormError("countdown needs whole numbers and a whole target") from err
            return {"numbers": numbers, "target": target}
        if self.task == "math":
            return {"problem": self.problem}
        return {"puzzle": self.puzzle}

    def build(self, **overrides: Any) -> tuple[Problem, EpisodeSettings]:
        if self.task not in TASKS:
            raise FormError(f"the task must be one of {', '.join(TASKS)}")
        try:
            problem = get_task(self.task).problem_from_payload(self.payload())
        except ValueError as err:
            raise FormError(f"invalid {self.task} problem: {err}") from err
        fields: dict[str, Any] = {"worker_timeout_s": HUMAN_WORKER_TIMEOUT_S, "stream_text": True}
        for name in ("capacity", "organizer_budget", "worker_budget", "worker_timeout_s"):
            value = getattr(self, name)
            if value:
                try:
                    fields[name] = float(value) if name == "worker_timeout_s" else int(value)
                except ValueError as err:
                    raise FormError(f"{name.replace('_', ' ')} must be a number") from err
        fields.update(overrides)
        try:
            settings = EpisodeSettings(**fields)
        except ValidationError as err:
            first = err.errors()[0]
            raise FormError(f"{'.'.join(str(x) for x in first['loc'])}: {first['msg']}") from err
        return problem, settings
