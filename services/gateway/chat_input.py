"""Turning a chat conversation into a task and its payload, for the OpenAI-compatible endpoint.

Which task: the served model name says it (``asyncthink-countdown``, ``-sudoku``, ``-math``, ``-chat``);
the plain ``asyncthink`` model lets the text choose (:func:`request_task`): a countdown statement or
payload runs countdown, a ``puzzle:`` line sudoku, a JSON payload the task its fields name; anything else
is free-form chat. A chat runs the **whole conversation** (system messages included). A graded task reads
the **last user message** only, because its episode answers one problem. Accepted forms, per task:

* any task: a JSON object, passed to the task as its payload (``{"numbers": [3, 7, 25, 50], "target": 75}``);
* countdown: ``numbers: 3 7 25 50 target: 75`` (commas allowed, either order, optional ``solutions: 4``);
* sudoku: the 16 cells as text (``1.3. ..2. 3... .4.1``; blanks are ``.`` or ``0``), optionally after
  ``puzzle:``;
* math: free text, the whole message is the problem;
* chat: any conversation of system, developer, user and assistant messages ending with the user's.

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

CHAT_ROLES = ("system", "developer", "user", "assistant")
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


def conversation(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """The messages as the chat task's payload list; ValueError for roles a conversation cannot hold."""
    out = []
    for k, message in enumerate(messages):
        if message.role not in CHAT_ROLES:
            raise ValueError(
                f"message {k} has role {message.role!r}; a conversation holds {', '.join(CHAT_ROLES)} messages"
            )
        out.append({"role": message.role, "content": message.text()})
    return out


def _json_task(value: dict[str, Any]) -> str | None:
    """The task a JSON payload's fields name, or None."""
    if "numbers" in value and "target" in value:
        return "countdown"
    for key, task in (("puzzle", "sudoku"), ("problem", "math"), ("messages", "chat"), ("prompt", "chat")):
        if key in value:
            return task
    return None


def request_task(model_task: str, messages: list[ChatMessage]) -> tuple[str, dict[str, Any]]:
    """``(task, payload)`` of a chat request. ``model_task`` is the served model's task, or ``auto``:
    the text picks countdown, sudoku or math when it states such a problem, and chat otherwise."""
    if model_task == "chat":
        return "chat", {"messages": conversation(messages)}
    text = last_user_text(messages)
    if model_task != "auto":
        return model_task, payload_from_text(model_task, text)
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict) and (task := _json_task(value)) is not None:
            return task, value
    if _NUMBERS.search(stripped) and _TARGET.search(stripped):
        return "countdown", payload_from_text("countdown", stripped)
    if _PUZZLE_PREFIX.match(stripped):
        return "sudoku", payload_from_text("sudoku", stripped)
    return "chat", {"messages": conversation(messages)}


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
    if task == "chat":
        return {"prompt": stripped}
    raise ValueError(f"no chat input format for task {task!r}; send the payload as a JSON object")
