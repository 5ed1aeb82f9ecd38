"""The model-backend interface the engine talks to.

Token in, token out: the engine keeps every sequence as token ids and extends a prefix with the ids of
injected text; a backend never re-tokenizes what it generated (re-tokenizing text changes token
boundaries and silently breaks RL). A request stops at the first of: a stop regex match in the decoded
output, EOS, or ``max_new_tokens``. The returned ids keep the stop text's tokens (as SGLang does), and
``text`` is the decode of exactly those ids.

Implementations: ``transformers_backend`` (in-process, CPU or GPU), ``sglang`` (native HTTP),
``openai_compat`` (vLLM and hosted models), and the trainer's batched slot engine.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable


class FinishReason(StrEnum):
    STOP = "stop"  # a stop pattern matched
    EOS = "eos"  # the model emitted its end-of-sequence token
    LENGTH = "length"  # max_new_tokens reached
    ABORT = "abort"  # the backend gave up (server error, cancelled)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1: all tokens
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class GenerateRequest:
    input_ids: list[int]  # the whole prefix: prompt, earlier output and injected text
    max_new_tokens: int
    stop_regex: str | None = None  # one pattern (alternation allowed), matched on the decoded output
    sampling: SamplingParams = field(default_factory=SamplingParams)
    session: str | None = None  # sticky-routing key (the episode id) so a replica keeps the prefix cached
    tag: str = ""  # who asks, for logs: "organizer", "worker 3", ...


@dataclass(frozen=True)
class GenerateResult:
    output_ids: list[int]  # newly generated ids, stop text included
    text: str  # decode of output_ids
    finish: FinishReason
    matched: str | None = None  # the text the stop pattern matched
    cached_tokens: int = 0  # prompt tokens the backend found cached (0 where unknown)
    weight_version: str | None = None  # the weights that produced the output, where the backend knows


@runtime_checkable
class ModelBackend(Protocol):
    """What the engine needs from a model."""

    model_id: str  # a name (a directory's basename, a served model name)

    @property
    def weight_version(self) -> str: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    async def generate(self, request: GenerateRequest) -> GenerateResult: ...

    async def aclose(self) -> None: ...


class TokenizerCodec:
    """``encode``/``decode`` through a local Hugging Face tokenizer (``self.tokenizer``), adding no special
    tokens: for backends that talk token ids to a server, which must mean what the served model means."""

    tokenizer: Any

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))


@functools.lru_cache(maxsize=64)
def _compile(regex: str) -> re.Pattern[str]:
    return re.compile(regex)


def stop_pattern(regex: str | None) -> re.Pattern[str] | None:
    """The compiled stop regex of a request (compiled once per pattern; a bad pattern raises re.error)."""
    return _compile(regex) if regex else None


def find_stop(text: str, pattern: re.Pattern[str] | None, search_from: int = 0) -> re.Match[str] | None:
    """The first stop match that ends at or after ``search_from`` (a helper for local backends)."""
    if pattern is None:
        return None
    start = max(0, search_from - 64)  # a tag is at most 64 chars; only recent text can complete one
    return pattern.search(text, start)


def error_message(data: Any) -> str:
    """The message of an HTTP error body: ``{"error": "..."}``, ``{"error": {"message": ...}}``,
    ``{"message": ...}`` or FastAPI's ``{"detail": ...}``; anything else, its first 500 characters."""
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, str):
            return err
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if "message" in data:
            return str(data["message"])
        if "detail" in data:
            return str(data["detail"])
    return str(data)[:500]
