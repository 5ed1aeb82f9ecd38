"""Turning a chat conversation into a task payload, for the OpenAI-compatible endpoint.

The problem is the **last user message**; earlier messages (a system prompt, a previous turn) are not
read, because an AsyncThink episode answers one problem. Accepted forms, per task:

* any task: a JSON object, passed to the task as its payload (``{"numbers": [3, 7, 25, 50], "target": 75}``);
* countdown: ``numbers: 3 7 25 50 target: 75`` (commas allowed, either order, optional ``solutions: 4``);
* sudoku: the 16 cells as text (``1.3. ..2. 3... .4.1``; blanks are ``.`` or ``0``), optionally after
  ``puzzle:``;
* math: free text, the whole message is the problem.

The task's ``problem_from_payload`` then validates the payload; its ValueError messages reach the
client unchanged. Limits: no natural-language understanding beyond these patterns.
"""

from __future__ import annotations

import json
import re
from typing import Any

from services.gateway.schemas import ChatMessage

_INT_LIST = r"\[?\s*-?\d+(?:\s*[,;\s]\s*-?\d+)*\s*\]?"
_NUMBERS = re.compile(rf"\bnumbers?\s*[:=]?\s*(?P<v>{_INT_LIST})", re.IGNORECASE)
_TARGET = re.compile(r"\btarget\s*[:=]?\s*(?P<v>-?\d+)", re.IGNORECASE)
_SOLUTIONS = re.compile(r"\b(?:n_solutions|solutions)\s*[:=]?\s*(?P<v>\d+)", re.IGNORECASE)
_PUZZLE_PREFIX = re.compile(r"^\s*(?:puzzle|sudoku)\s*[:=]\s*", re.IGNORECASE)

COUNTDOWN_HINT = "write e.g. 'numbers: 3 7 25 50 target: 75', or send the payload as a JSON object"


def last_user_text(messages: list[ChatMessage]) -> str:
    """The text of the last user message; ValueError when there is none or it is empty."""
    for message in reversed(messages):
        if message.role == "user":
            text = message.text().strip()
            if not text:
                raise ValueError("the last user message is empty; it must state the problem")
            return text
    raise ValueError("no user message: the last user message states the problem")


def _ints(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"-?\d+", text)]


def payload_from_text(task: str, text: str) -> dict[str, Any]:
    """The task payload a message describes (see the module docstring); ValueError when it cannot tell."""
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError as err:
            raise ValueError(f"the message looks like JSON but does not parse: {err}") from err
        if not isinstance(value, dict):
            raise ValueError("a JSON payload must be an object")
        return value
    if task == "countdown":
        numbers, target = _NUMBERS.search(stripped), _TARGET.search(stripped)
        if numbers is None or target is None:
            missing = "numbers" if numbers is None else "target"
            raise ValueError(f"could not find the {missing} of the countdown problem: {COUNTDOWN_HINT}")
        payload: dict[str, Any] = {"numbers": _ints(numbers.group("v")), "target": int(target.group("v"))}
        solutions = _SOLUTIONS.search(stripped)
        if solutions is not None:
            payload["n_solutions"] = int(solutions.group("v"))
        return payload
    if task == "sudoku":
        puzzle = _PUZZLE_PREFIX.sub("", stripped)
        return {"puzzle": re.sub(r"[\s|/,]", "", puzzle)}
    if task == "math":
        return {"problem": stripped}
    raise ValueError(f"no chat input format for task {task!r}; send the payload as a JSON object")
