"""The model-backend interface the engine talks to.

Token in, token out: the engine keeps every sequence as token ids and extends a prefix with the ids of
injected text; a backend never re-tokenizes what it generated (re-tokenizing text changes token
boundaries and silently breaks RL). A request stops at the first of: a stop regex match in the decoded
output, EOS, or ``max_new_tokens``. The returned ids keep the stop text's tokens (as SGLang does), and
``text`` is the decode of exactly those ids.

Implementations: ``transformers_backend`` (in-process, CPU or GPU), ``sglang`` (native HTTP),
``openai_compat`` (vLLM and hosted models), and the trainer's batched slot engine.

Weights. Every backend declares in ``weight_sources`` how it can take new weights (:class:`WeightSource`:
a torch module in the same process, or a checkpoint directory on disk; empty: not at all) and takes them
with ``update_weights(WeightUpdate)``, after which ``weight_version`` (and every result it produces) is
the update's ``version``. A backend asked for a source it does not declare raises
:class:`WeightUpdateUnsupported`. Backends with fixed weights inherit :class:`FixedWeights`.

Version labels. Every result says which weights produced it: ``weight_version`` (the version of its last
token) and, when a request lived through a weight swap, ``weight_versions``: spans of output positions
per version (:class:`VersionSpan`), so text generated under the old weights is never labelled with the
new ones. A sequence built from several results (one agent's segment) that mixes versions is labelled
with all of them in order, joined by ``+`` (:func:`version_label`); a version label therefore never
contains ``+``. A backend whose weights live in a server that other clients share (SGLang) sets
``remote_weights = True``: one place swaps the server, its other clients only learn the new version.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from shared.tasks.prompts import PromptStyle, plain_chat


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
    # The whole prefix: prompt, earlier output and injected text. The engine hands over its own growing
    # list (no copy per call, which would cost time quadratic in an agent's length): it is not changed
    # during the call, so a backend that keeps it past the call copies it.
    input_ids: list[int]
    max_new_tokens: int
    stop_regex: str | None = None  # one pattern (alternation allowed), matched on the decoded output
    sampling: SamplingParams = field(default_factory=SamplingParams)
    session: str | None = None  # sticky-routing key (the episode id) so a replica keeps the prefix cached
    tag: str = ""  # who asks, for logs: "organizer", "worker 3", ...
    # Called on the caller's event loop with each piece of decoded text as it is generated, by backends
    # that stream (the in-process transformers backend); others return the whole text at once.
    on_text: Callable[[str], None] | None = field(default=None, compare=False)
    # Scheduling priority (larger: served first; shared.agents.PRIORITY_*): the organizer, then workers a
    # join waits for, then the others. Sent to servers that schedule by it (SGLang's ``priority``); None:
    # the server's default.
    priority: int | None = None


@dataclass(frozen=True)
class VersionSpan:
    """Output positions ``[start, end)`` of one result that the weights ``version`` produced."""

    version: str
    start: int
    end: int


@dataclass(frozen=True)
class GenerateResult:
    output_ids: list[int]  # newly generated ids, stop text included
    text: str  # decode of output_ids
    finish: FinishReason
    matched: str | None = None  # the text the stop pattern matched
    cached_tokens: int = 0  # prompt tokens the backend found cached (0 where unknown)
    weight_version: str | None = None  # the weights that produced the output (its last token), where known
    # per-version spans over output positions when a weight swap happened during the request; empty when
    # one version (weight_version) produced every token
    weight_versions: tuple[VersionSpan, ...] = ()

    @property
    def versions(self) -> list[str]:
        """The versions that produced this output, in order (empty where the backend does not know)."""
        if self.weight_versions:
            return distinct(s.version for s in self.weight_versions if s.end > s.start) or [
                self.weight_versions[-1].version
            ]
        return [self.weight_version] if self.weight_version else []


VERSION_SEPARATOR = "+"


def distinct(items: Any) -> list[str]:
    """``items`` without repeats, first occurrence first."""
    out: list[str] = []
    for item in items:
        if item and item not in out:
            out.append(item)
    return out


def version_label(versions: Any) -> str | None:
    """The label of a sequence produced by ``versions`` (in order): one version, or ``a+b`` when a weight
    swap happened during it; None for none."""
    parts = distinct(part for v in versions if v for part in str(v).split(VERSION_SEPARATOR))
    return VERSION_SEPARATOR.join(parts) if parts else None


def split_version_label(label: str | None) -> list[str]:
    """The versions a label names (``a+b`` -> ``[a, b]``; None -> ``[]``)."""
    return distinct(label.split(VERSION_SEPARATOR)) if label else []


class WeightSource(StrEnum):
    MODULE = "module"  # a torch module in this process (the trainer's model): its tensors are copied
    PATH = "path"  # a checkpoint directory (safetensors and config) the backend loads itself


@dataclass(frozen=True)
class WeightUpdate:
    """New weights for a backend, and the version label everything generated with them carries."""

    version: str
    module: Any = None  # a torch.nn.Module with the backend's architecture (WeightSource.MODULE)
    path: str | None = None  # a checkpoint directory (WeightSource.PATH)

    def __post_init__(self) -> None:
        if not self.version:
            raise ValueError("a weight update needs a non-empty version label")
        if VERSION_SEPARATOR in self.version:
            raise ValueError(
                f"version label {self.version!r} contains {VERSION_SEPARATOR!r}, which joins the versions of "
                "a sequence generated across a weight swap; pick another label"
            )
        if (self.module is None) == (self.path is None):
            raise ValueError("a weight update carries exactly one of module= or path=")

    @property
    def source(self) -> WeightSource:
        return WeightSource.MODULE if self.module is not None else WeightSource.PATH


class WeightUpdateUnsupported(RuntimeError):
    """The backend cannot take weights from this source (see its ``weight_sources``)."""


@runtime_checkable
class ModelBackend(Protocol):
    """What the engine needs from a model."""

    model_id: str  # a name (a directory's basename, a served model name)
    weight_sources: frozenset[WeightSource]  # how update_weights may be fed; empty: fixed weights
    prompt_style: PromptStyle  # trained on the protocol's short prompts, or taught it by a system message

    def format_chat(self, messages: list[dict[str, str]]) -> str:
        """Chat messages as this model's prompt text (its chat template; plain lines without one)."""
        ...

    @property
    def weight_version(self) -> str: ...

    async def update_weights(self, update: WeightUpdate) -> None:
        """Take new weights (only from a declared source); ``weight_version`` becomes ``update.version``."""
        ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    async def generate(self, request: GenerateRequest) -> GenerateResult: ...

    async def aclose(self) -> None: ...


def check_source(backend: ModelBackend, update: WeightUpdate) -> None:
    """Raise :class:`WeightUpdateUnsupported` unless ``backend`` declares the update's source."""
    if update.source not in backend.weight_sources:
        declared = ", ".join(sorted(s.value for s in backend.weight_sources)) or "none"
        raise WeightUpdateUnsupported(
            f"{type(backend).__name__} ({backend.model_id}) cannot take weights from a {update.source.value}; "
            f"it accepts: {declared}"
        )


class FixedWeights:
    """For backends whose weights this process cannot change (a hosted model, a scripted stand-in)."""

    weight_sources: frozenset[WeightSource] = frozenset()

    async def update_weights(self, update: WeightUpdate) -> None:
        check_source(self, update)  # type: ignore[arg-type]


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """``messages`` in the tokenizer's chat template, ready for the assistant's turn; plain ``Role: text``
    lines when the tokenizer has no template."""
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return plain_chat(messages)


class TokenizerCodec:
    """``encode``/``decode`` through a local Hugging Face tokenizer (``self.tokenizer``), adding no special
    tokens: for backends that talk token ids to a server, which must mean what the served model means."""

    tokenizer: Any
    prompt_style: PromptStyle = PromptStyle.PROTOCOL  # a served model was not trained on our prompts

    def format_chat(self, messages: list[dict[str, str]]) -> str:
        return render_chat(self.tokenizer, messages)

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
