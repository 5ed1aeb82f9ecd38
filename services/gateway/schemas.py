"""Request and response models of the gateway's REST API (pydantic), apart from the store's tables.

Two families live here:

* the AsyncThink API: :class:`ProblemCreate` (what ``POST /v1/problems`` accepts: the episode settings of
  :class:`~shared.episode.EpisodeSettings` as top-level fields, with their bounds) and :class:`ProblemAccepted` (its 202 answer); episode bodies come from
  :mod:`shared.store.schemas`;
* the OpenAI-compatible API: chat completion requests, responses and stream chunks, the model list
  and the error body, shaped like OpenAI's so the official ``openai`` client parses them unmodified.

Limits: the chat request accepts (and ignores) OpenAI sampling options the engine has no use for
(``frequency_penalty``, ``logprobs`` ...); only one choice (``n = 1``) is produced.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.episode import MAX_BUDGET, EpisodeSettings
from shared.store.schemas import EpisodePublic, EpisodeSummary, SegmentPublic
from shared.tasks import TASK_NAMES


# ----------------------------------------------------------------------------- AsyncThink API
class ProblemCreate(EpisodeSettings):
    """A problem to run as one episode, with the episode settings as top-level fields."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=False,
        json_schema_extra={
            "examples": [
                {
                    "task": "countdown",
                    "payload": {"numbers": [3, 7, 25, 50], "target": 75},
                    "mode": "asyncthink",
                }
            ]
        },
    )

    task: str = Field(description=f"Task name: one of {', '.join(TASK_NAMES)}.")
    payload: dict[str, Any] = Field(description="The task's problem fields, checked by the task itself.")
    problem_id: str | None = Field(
        None,
        min_length=1,
        max_length=255,
        description="Your id for the problem; default: derived by the task. Problems are immutable: an id "
        "already stored with another payload is a 409.",
    )
    model: str | None = Field(
        None,
        min_length=1,
        max_length=255,
        description="Which served model runs it (the served weights or a name from GET /v1/models; any other "
        "is a 422); default: the gateway's.",
    )

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        if value not in TASK_NAMES:
            raise ValueError(f"unknown task {value!r}; choose one of: {', '.join(TASK_NAMES)}")
        return value


class EpisodeLinks(BaseModel):
    self: str = Field(description="The episode (poll it until its status is final).")
    events: str = Field(description="Server-Sent Events of the episode as it runs.")


class ProblemAccepted(BaseModel):
    """The answer to a submission: the episode is stored as pending and queued for an organizer."""

    episode_id: str
    status: Literal["pending"] = "pending"
    links: EpisodeLinks


class SegmentDetail(SegmentPublic):
    """One agent's sequence; token ids and masks only when asked for (``include_tokens=true``)."""

    prompt_ids: list[int] | None = None  # type: ignore[assignment]
    completion_ids: list[int] | None = None  # type: ignore[assignment]
    completion_mask: list[int] | None = None  # type: ignore[assignment]
    prompt_tokens: int = Field(0, description="Tokens of the agent's prompt.")
    completion_tokens: int = Field(
        0, description="Tokens after the prompt: generated plus injected by Joins."
    )
    injected_tokens: int = Field(0, description="Tokens a Join injected (masked out of training).")

    @classmethod
    def from_public(cls, seg: SegmentPublic, *, include_tokens: bool) -> SegmentDetail:
        data = seg.model_dump()
        data.update(
            prompt_tokens=len(seg.prompt_ids),
            completion_tokens=len(seg.completion_ids),
            injected_tokens=len(seg.completion_mask) - sum(seg.completion_mask),
        )
        if not include_tokens:
            data.update(prompt_ids=None, completion_ids=None, completion_mask=None)
        return cls(**data)


class EpisodeDetail(EpisodePublic):
    """A whole episode: status, answer, reward parts, T, η, η/c, wall time, format errors and segments."""

    segments: list[SegmentDetail] = Field(default_factory=list)  # type: ignore[assignment]


class EpisodeList(BaseModel):
    """One page of episodes, newest first, and how many match the filters in all."""

    items: list[EpisodeSummary]
    total: int = Field(description="Episodes matching the filters, over all pages.")
    limit: int
    offset: int


# ----------------------------------------------------------------------------- OpenAI-compatible API
class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str = Field(description="system, developer, user, assistant or tool.")
    content: str | list[dict[str, Any]] | None = Field(
        None, description="Text, or a list of content parts of which the text parts are read."
    )
    name: str | None = None

    def text(self) -> str:
        """The message's text (text parts joined by newlines)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(
            str(p.get("text", "")) for p in self.content if p.get("type") in ("text", "input_text")
        )


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ChatCompletionRequest(EpisodeSettings):
    """OpenAI's chat completion request plus AsyncThink's episode options as extra body fields.

    The last user message is the problem. ``max_tokens`` / ``max_completion_tokens`` set the
    organizer budget unless ``organizer_budget`` is given.
    """

    model_config = ConfigDict(extra="ignore", frozen=False)

    model: str = Field(
        max_length=255, description="A served model from GET /v1/models, e.g. asyncthink-countdown."
    )
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="Only one choice is produced.")
    max_tokens: int | None = Field(None, ge=1, le=MAX_BUDGET)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_BUDGET)
    timeout_s: float = Field(
        300.0,
        gt=0,
        le=3600,
        description="How long to wait for the episode; past it the answer is 504 with the episode id to poll.",
    )
    user: str | None = Field(None, max_length=255)
    problem_id: str | None = Field(
        None,
        min_length=1,
        max_length=255,
        description="Your id for the problem (as in POST /v1/problems); default: derived by the task.",
    )

    def episode_settings(self) -> EpisodeSettings:
        """The episode settings it asks for; ``max_tokens`` sets the organizer budget unless given."""
        settings = super().episode_settings()
        budget = self.max_completion_tokens or self.max_tokens
        if budget is not None and "organizer_budget" not in self.model_fields_set:
            settings = settings.model_copy(update={"organizer_budget": budget})
        return settings


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = Field(description="The answer (the text inside <ANSWER>).")
    reasoning_content: str | None = Field(
        None,
        description="The organizer's whole text: thinking, <FORK-i>/<JOIN-i> tags and each join's injected "
        "result up to </JOIN-i>. None in parallel mode.",
    )


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] = "stop"
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int = Field(
        description="Prompt tokens of the organizer (of every trace, in parallel mode)."
    )
    completion_tokens: int = Field(description="Every token generated by the organizer and all its workers.")
    total_tokens: int
    critical_path_tokens: int | None = Field(
        None, description="Critical-path latency T: decoded tokens on the longest organizer/worker path."
    )


class AsyncThinkInfo(BaseModel):
    """What the episode measured (T and η, see docs/design.md), beside the answer."""

    status: str
    mode: str
    capacity: int
    latency: int | None = Field(description="Critical-path latency T, in decoded tokens.")
    eta: float | None = Field(description="Thinking concurrency η.")
    eta_over_c: float | None
    wall_time_s: float | None
    forks: int
    accuracy: float | None
    reward: float | None
    format_errors: list[dict[str, Any]]


class ChatCompletion(BaseModel):
    id: str = Field(description="chatcmpl-<episode_id>.")
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = Field(None, description="The weight version that produced the answer.")
    episode_id: str
    asyncthink: AsyncThinkInfo


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None  # the answer, once </ANSWER> closes
    reasoning_content: str | None = None  # the organizer's text as it is decoded


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    episode_id: str
    asyncthink: AsyncThinkInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "asyncthink"
    task: str = Field(description="The AsyncThink task this model name answers.")
    served_model: str = Field(description="The model (weights) behind it.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body."""

    error: ErrorDetail
