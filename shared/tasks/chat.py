"""The free-form task: any conversation, no grader.

What a chat request gets unless its model name or its text picks a graded task (countdown, sudoku,
math). The payload is the conversation, ``{"messages": [{"role": ..., "content": ...}, ...]}`` (roles
``system``, ``developer``, ``user``, ``assistant``; the last message is the user's), or the shorthand
``{"prompt": "...", "system": "..."}``. There is no reference answer: :meth:`ChatTask.score` returns
``None`` and the episode's accuracy stays unset; rewards have no accuracy part.

Prompts: for a model trained on the protocol, the conversation as plain ``Role: text`` lines then the
mode's hint (as the other tasks do); a model that was not trained on the protocol gets its chat template
and a system message that teaches the protocol instead (:mod:`shared.tasks.prompts`).

Limits: at most ``MAX_MESSAGES`` messages and ``MAX_CHARS`` characters in all, so a request's prompt is
bounded before any work; parallel thinking aggregates by majority vote of the exact answers (ties: the
first given).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any

from shared.tasks.base import Mode, Problem, Score
from shared.tasks.prompts import mode_hint, worker_prompt

ROLES = ("system", "developer", "user", "assistant")
MAX_MESSAGES = 64
MAX_CHARS = 32_000


def normalize_messages(payload: dict[str, Any]) -> list[dict[str, str]]:
    """The payload's conversation as ``[{"role", "content"}]``; ValueError saying what is wrong."""
    if not isinstance(payload, dict):
        raise ValueError("the chat payload must be a JSON object")
    if "messages" in payload:
        unknown = set(payload) - {"messages"}
        raw = payload["messages"]
    else:
        unknown = set(payload) - {"prompt", "system"}
        if not isinstance(payload.get("prompt"), str):
            raise ValueError('give "messages": [{"role": "user", "content": "..."}] or "prompt": "..."')
        raw = ([{"role": "system", "content": payload["system"]}] if payload.get("system") else []) + [
            {"role": "user", "content": payload["prompt"]}
        ]
    if unknown:
        raise ValueError(f"unknown chat payload field(s) {sorted(unknown)}")
    if not isinstance(raw, list) or not raw:
        raise ValueError('"messages" must be a non-empty list')
    if len(raw) > MAX_MESSAGES:
        raise ValueError(f"at most {MAX_MESSAGES} messages, got {len(raw)}")
    messages: list[dict[str, str]] = []
    for k, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {k} must be {{\"role\": one of {', '.join(ROLES)}, \"content\": text}}")
        messages.append({"role": m["role"], "content": m["content"]})
    if messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise ValueError("the last message must be the user's, with text")
    total = sum(len(m["content"]) for m in messages)
    if total > MAX_CHARS:
        raise ValueError(f"the conversation has {total} characters; at most {MAX_CHARS}")
    return messages


class ChatTask:
    """Free-form questions, answered in ``<ANSWER>...</ANSWER>``; nothing to grade."""

    name = "chat"
    default_capacity = 4  # the organizer and up to three workers, as the paper's math setting

    def problem_from_payload(self, payload: dict[str, Any], problem_id: str | None = None) -> Problem:
        messages = normalize_messages(payload)
        digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]
        return Problem(task=self.name, id=problem_id or f"chat-{digest}", payload={"messages": messages})

    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        raise ValueError(
            "the chat task has no problem splits; give a JSONL file of payloads "
            '({"prompt": ...} or {"messages": [...]}) with --split PATH.jsonl'
        )

    def organizer_prompt(self, problem: Problem, mode: Mode) -> str:
        lines = [f"{m['role'].capitalize()}: {m['content'].strip()}" for m in problem.payload["messages"]]
        return "\n".join(lines) + "\n" + mode_hint(mode)

    def worker_prompt(self, query: str) -> str:
        return worker_prompt(query)

    def score(self, problem: Problem, answer: str | None) -> Score | None:
        return None  # no reference answer

    def aggregate(self, answers: list[str | None], problem: Problem | None = None) -> str | None:
        """Majority vote over the exact (stripped) answers; ties go to the first given."""
        given = [a.strip() for a in answers if a and a.strip()]
        if not given:
            return None
        counts = Counter(given)
        best = max(counts.values())
        return next(a for a in given if counts[a] == best)
