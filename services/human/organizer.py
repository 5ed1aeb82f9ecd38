"""The human organizer: a person writes the organizer's text of an episode; everything else runs as usual.

:class:`HumanOrganizerBackend` wraps the served backend for one episode. The organizer's requests
(``tag == "organizer"``, this episode's session) are answered with what the person writes on the gateway's
organizer page (read in order from :func:`~services.human.notices.organizer_input_stream`); every other
request (the model's workers) goes to the wrapped backend. The engine, the protocol parser, the workers,
the timeline, T and η and the store are the same as for a model organizer: a ``</FORK-i>`` the person
writes starts worker ``i`` at once, a ``<JOIN-i>`` waits for it and injects its result, ``<ANSWER>`` ends
the episode, a malformed tag is a format error.

Like a model, a generate call returns at the first stop match (text past it is kept for the next call),
and streams each piece as it arrives (``on_text``) so the page shows it live. Token ids are the wrapped
backend's encoding of the person's text, so the stored episode is tokenized like any other; its organizer
segment is marked ``author="human"`` (see :mod:`services.human.engine`): the convention that tells
trainers these mask-1 tokens were written by a person, not sampled from the model.

A person silent for ``idle_s`` seconds, or who gives up on the page, ends the episode (the request is
answered ``abort``: the episode fails with "backend aborted the request").
"""

from __future__ import annotations

import asyncio
import logging
import time

from services.human.notices import INPUT_MAXLEN, organizer_input_stream
from shared.backends.base import (
    FinishReason,
    GenerateRequest,
    GenerateResult,
    ModelBackend,
    WeightUpdate,
    stop_pattern,
)
from shared.bus.base import Bus

log = logging.getLogger(__name__)

ORGANIZER = "organizer"
HUMAN_VERSION = "human"  # the weight version of text a person wrote


async def send_text(bus: Bus, episode_id: str, text: str, *, by: str | None) -> str:
    """What the person wrote next, for the organizer of ``episode_id``."""
    return await bus.publish(organizer_input_stream(episode_id), {"text": text, "by": by or ""}, maxlen=INPUT_MAXLEN)


async def give_up(bus: Bus, episode_id: str, *, by: str | None) -> str:
    return await bus.publish(organizer_input_stream(episode_id), {"abort": "1", "by": by or ""}, maxlen=INPUT_MAXLEN)


class HumanOrganizerBackend:
    """See the module docstring. ``bus`` None: every organizer request aborts (no input channel)."""

    def __init__(self, inner: ModelBackend, bus: Bus | None, episode_id: str, *, idle_s: float = 1800.0) -> None:
        self.inner = inner
        self.bus = bus
        self.episode_id = episode_id
        self.idle_s = idle_s
        self.model_id = inner.model_id
        self.weight_sources = inner.weight_sources
        self.prompt_style = inner.prompt_style
        self._buffer = ""  # what the person wrote and no generate call has returned yet
        self._after = "0"
        self._aborted = False

    @property
    def weight_version(self) -> str:
        return self.inner.weight_version

    def format_chat(self, messages: list[dict[str, str]]) -> str:
        return self.inner.format_chat(messages)

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.inner.decode(ids)

    async def update_weights(self, update: WeightUpdate) -> None:
        await self.inner.update_weights(update)

    async def aclose(self) -> None:
        return None  # the wrapped backend belongs to the service

    async def _more(self, deadline: float) -> bool:
        """Wait for the person's next input; False when they gave up or stayed silent past the deadline."""
        assert self.bus is not None
        stream = organizer_input_stream(self.episode_id)
        while not self._aborted:
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("episode %s: the human organizer was silent for %.0f s", self.episode_id, self.idle_s)
                return False
            try:
                entries = await self.bus.read(stream, after=self._after, count=100, block_ms=int(min(left, 5.0) * 1000))
            except Exception as exc:
                log.warning("reading %s failed (%s); retrying", stream, exc)
                await asyncio.sleep(0.5)
                continue
            for entry in entries:
                self._after = entry.id
                if entry.fields.get("abort"):
                    self._aborted = True
                    return False
                self._buffer += entry.fields.get("text", "")
            if entries:
                return True
        return False

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        if request.tag != ORGANIZER or request.session != self.episode_id:
            return await self.inner.generate(request)
        if self.bus is None:
            return GenerateResult([], "", FinishReason.ABORT)
        pattern = stop_pattern(request.stop_regex)
        streamed = 0
        deadline = time.monotonic() + self.idle_s
        while True:
            match = pattern.search(self._buffer) if pattern is not None else None
            cut = match.end() if match else len(self._buffer)
            ids = self.inner.encode(self._buffer[:cut])
            if len(ids) > request.max_new_tokens:  # the budget: the rest is never read
                ids = ids[: request.max_new_tokens]
                text = self.inner.decode(ids)
                self._buffer = ""
                self._stream(request, text, streamed)
                return GenerateResult(ids, text, FinishReason.LENGTH, weight_version=HUMAN_VERSION)
            if match:
                text, self._buffer = self._buffer[:cut], self._buffer[cut:]
                self._stream(request, text, streamed)
                return GenerateResult(ids, text, FinishReason.STOP, match.group(0), weight_version=HUMAN_VERSION)
            streamed = self._stream(request, self._buffer, streamed)
            if not await self._more(deadline):
                text, self._buffer = self._buffer, ""
                return GenerateResult(self.inner.encode(text), text, FinishReason.ABORT, weight_version=HUMAN_VERSION)
            deadline = time.monotonic() + self.idle_s

    @staticmethod
    def _stream(request: GenerateRequest, text: str, streamed: int) -> int:
        """Send the part of ``text`` past ``streamed`` characters to ``on_text``; the new count."""
        if request.on_text is not None and len(text) > streamed:
            request.on_text(text[streamed:])
        return max(streamed, len(text))
