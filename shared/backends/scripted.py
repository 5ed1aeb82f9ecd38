"""A scripted, fixed-rate backend: replays given text per agent, one character per token.

Not a language model. It exists for two honest uses: driving the engine through exact, hand-written
traces (the scenario suites run the same scripts embedded and distributed), and benchmarking the
orchestration with a model that emits tokens at a fixed rate, so that the model is not what is
measured (``bench/``). Select it explicitly (``--model scripted:...``); it is never a default.

A script maps an agent name ("organizer", "1", "1.2", "trace-1") to the text that agent generates.
Injected join results are not part of a script: the engine appends them. Each ``generate`` call
continues the agent's script from where its last call stopped and stops where the request's
stop regex first matches, or at the script's end (reported as EOS), or at ``max_new_tokens``.
Token ids are Unicode code points, so ``encode``/``decode`` are exact. As every backend does, it refuses
an empty ``input_ids`` (ValueError) and, after ``aclose``, any request (RuntimeError).

Where an agent is in its script: by default a cursor per ``(session, agent)`` that each call advances, so
a second run of the same agent in the same process continues where the first stopped. With
``resumable=True`` (a mapping script only) there is no cursor: the position is read from the request's
input, as a model continues whatever prefix it is given. The input is the prompt followed by the
agent's text so far, in which each ``<JOIN-i>`` is followed by the injected result up to
``</JOIN-i>``; with the injected results left out, the position is the longest beginning of the script
that the input ends with. So an organizer resumed in another process from a stored prefix, or a worker
task computed twice (concurrently, or again in the same process), decodes exactly what an uninterrupted
run would. Limits of that mode: the prompt must not end with the beginning of the script (a prompt
"...\nA" before a script "A..." would read as one token already generated), and each call costs a scan
of the input.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping
from typing import Any

from shared.backends.base import FinishReason, FixedWeights, GenerateRequest, GenerateResult
from shared.tasks.prompts import PromptStyle, plain_chat

Script = Mapping[str, str] | Callable[[str, str], str]

_INJECTED = re.compile(r"(<JOIN-(\d+)>).*?</JOIN-\2>", re.DOTALL)  # a join tag and the result injected after it


def script_position(script: str, text: str) -> int:
    """How much of ``script`` an agent whose input is ``text`` has generated (see the module doc)."""
    generated = _INJECTED.sub(r"\1", text)
    for k in range(min(len(script), len(generated)), 0, -1):
        if generated[-1] == script[k - 1] and generated.endswith(script[:k]):
            return k
    return 0


class CodePoints(FixedWeights):
    """Token ids are Unicode code points, so ``encode``/``decode`` are exact; the weights are "scripted"."""

    prompt_style = PromptStyle.TRAINED

    def format_chat(self, messages: list[dict[str, str]]) -> str:
        return plain_chat(messages)

    @property
    def weight_version(self) -> str:
        return "scripted"

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


class ScriptedBackend(CodePoints):
    """``script``: agent name -> text, or a function (agent, prompt) -> text for per-prompt scripts."""

    def __init__(
        self,
        script: Script,
        *,
        tokens_per_s: float | None = None,
        model_id: str = "scripted",
        resumable: bool = False,
    ) -> None:
        if resumable and callable(script):
            raise ValueError("resumable=True needs a mapping script (agent -> text): a callable one depends on a prompt")
        self.script = script
        self.resumable = resumable
        self.tokens_per_s = tokens_per_s
        self.model_id = model_id
        self._cursor: dict[tuple[str | None, str], int] = {}
        self._prompts: dict[tuple[str | None, str], str] = {}
        self.calls = 0
        self._closed = False

    def _text_for(self, agent: str, prompt: str) -> str:
        if callable(self.script):
            return self.script(agent, prompt)
        if agent not in self.script:
            raise KeyError(f"no script for agent {agent!r}; scripted agents: {sorted(self.script)}")
        return self.script[agent]

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        if self._closed:
            raise RuntimeError("the scripted backend is closed")
        if not request.input_ids:
            raise ValueError("input_ids is empty: a request needs at least one prompt token")
        self.calls += 1
        agent = request.tag
        key = (request.session, agent)
        if self.resumable:
            full = self._text_for(agent, "")
            start = script_position(full, self.decode(request.input_ids))
        else:
            start = self._cursor.get(key, 0)
            prompt = self._prompts.get(key)
            if prompt is None:  # the first call's input is the prompt; later calls' inputs are not decoded
                prompt = self._prompts[key] = self.decode(request.input_ids)
            full = self._text_for(agent, prompt)
        rest = full[start:]
        end, finish, matched = len(rest), FinishReason.EOS, None
        if request.stop_regex:
            m = re.search(request.stop_regex, rest)
            if m:
                end, finish, matched = m.end(), FinishReason.STOP, m.group(0)
        if end > request.max_new_tokens:
            end, finish, matched = request.max_new_tokens, FinishReason.LENGTH, None
        piece = rest[:end]
        if not self.resumable:
            self._cursor[key] = start + end
        if self.tokens_per_s:
            await asyncio.sleep(len(piece) / self.tokens_per_s)
        else:
            await asyncio.sleep(0)
        return GenerateResult(self.encode(piece), piece, finish, matched)

    async def aclose(self) -> None:
        self._closed = True


class ScriptRouter(CodePoints):
    """Routes each request to one of several :class:`ScriptedBackend` s, chosen by :meth:`route`
    (for suites and benchmarks that run many scripted episodes, keyed by episode id, through one backend).
    Token ids are code points, as in :class:`ScriptedBackend`."""

    model_id = "scripted-router"

    def route(self, request: GenerateRequest) -> Any:
        raise NotImplementedError

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        result: GenerateResult = await self.route(request).generate(request)
        return result

    async def aclose(self) -> None:
        return None
