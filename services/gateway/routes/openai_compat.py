"""The OpenAI-compatible API: ``POST /v1/chat/completions`` and ``GET /v1/models``.

The official ``openai`` client works against it unmodified. Any prompt gets an answer: the model
``asyncthink`` runs a countdown, sudoku or math problem when the text states one and a free-form chat
otherwise; ``asyncthink-chat``, ``-countdown``, ``-math`` and ``-sudoku`` fix the task (see
:mod:`services.gateway.chat_input`). A chat runs the whole conversation, system message included.
The episode settings (``mode``, ``capacity``, ``organizer_budget``, ``worker_budget``, ``parallel_k``
...) and ``timeout_s`` ride as extra body fields (``extra_body=`` in the client); ``max_tokens`` sets the
organizer budget. The request submits an episode exactly as ``POST /v1/problems`` does and waits for it:

* the answer is a ``chat.completion`` whose ``content`` is the episode's answer (the text inside
  ``<ANSWER>``; when the organizer wrote none, its text as written, with ``finish_reason`` ``length`` if
  the budget ran out) and whose ``reasoning_content`` is the organizer's whole text: its thinking, its
  ``<FORK-i>…</FORK-i>`` and ``<JOIN-i>`` tags, and each join's injected result up to ``</JOIN-i>``;
  ``id`` is ``chatcmpl-<episode_id>``, the extra fields ``episode_id`` and ``asyncthink`` (status, T, η,
  η/c, wall time, forks, reward) describe the episode; ``usage`` counts the organizer's prompt tokens,
  every token the organizer and its workers generated, and ``critical_path_tokens`` (T);
* ``stream=true`` answers OpenAI-style SSE ``chat.completion.chunk`` chunks: the role, then the
  organizer's text as ``delta.reasoning_content`` as it is decoded (token by token with the in-process
  model; at each tag with a served one), the answer as ``delta.content`` the moment ``</ANSWER>``
  closes, a last chunk with ``finish_reason`` and ``asyncthink`` (and a usage chunk when
  ``stream_options.include_usage``), then ``data: [DONE]``;
* past ``timeout_s`` the answer is 504 (or an error chunk when streaming) naming the episode id, so the
  client can poll ``GET /v1/episodes/{id}``; the episode keeps running.

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for bad input, 404
for an unknown model, 503 when the episode could not be queued, 502 when it failed.

Limits: one choice (``n = 1``); only the organizer's text is streamed (workers' text is in the stored
segments); no tool calls.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, Response
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from services.gateway.auth import ModelsKey, SubmitKey
from services.gateway.chat_input import request_task
from services.gateway.deps import StateDep
from services.gateway.errors import OpenAIError, SubmissionError, scrub
from services.gateway.schemas import (
    AssistantMessage,
    AsyncThinkInfo,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    ErrorResponse,
    ModelCard,
    ModelList,
    Usage,
)
from services.gateway.sse import SSE_HEADERS, sse_comment
from services.gateway.state import GatewayState
from services.gateway.submission import (
    follow_events,
    in_thread,
    problem_from_request,
    submit_episode,
    wait_finished,
)
from shared.messages import EpisodeStatus, EventKind
from shared.store import repository
from shared.store.models import Episode

router = APIRouter(prefix="/v1", tags=["openai-compatible"])

FinishReason = Literal["stop", "length"]

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": why}
    for code, why in (
        (400, "Invalid request (OpenAI error shape)."),
        (404, "Unknown model."),
        (409, "The problem_id is bound to another payload (problems are immutable)."),
        (502, "The episode failed."),
        (503, "The episode could not be queued."),
        (504, "The episode did not finish in time; the message names its id."),
    )
}


def _card(state: GatewayState, name: str, task: str) -> ModelCard:
    return ModelCard(id=name, created=int(state.started_at), task=task, served_model=state.model_id)


@router.get("/models", response_model=ModelList, summary="Served models (OpenAI-compatible)")
async def list_models(state: StateDep, _: ModelsKey) -> ModelList:
    return ModelList(data=[_card(state, name, task) for name, task in state.chat_models.items()])


@router.get("/models/{model}", response_model=ModelCard, summary="One served model", responses=ERRORS)
async def get_model(model: str, state: StateDep, _: ModelsKey) -> ModelCard:
    task = state.chat_models.get(model)
    if task is None:
        raise _unknown_model(state, model)
    return _card(state, model, task)


def _unknown_model(state: GatewayState, model: str) -> OpenAIError:
    known = ", ".join(state.chat_models)
    return OpenAIError(
        404,
        f"the model {model[:64]!r} does not exist; served models: {known}",
        param="model",
        code="model_not_found",
    )


# ----------------------------------------------------------------------------- building answers
@dataclass
class _Finished:
    episode: Episode
    usage: Usage
    organizer_text: str | None  # the organizer's whole text (None in parallel mode: k traces)

    @property
    def content(self) -> str:
        """The answer; when there is none (a format error), the organizer's text as written."""
        if self.episode.answer is not None:
            return self.episode.answer
        return self.organizer_text or ""


def _load(session: Session, episode_id: str) -> tuple[Episode | None, Usage, str | None]:
    episode = repository.get_episode(session, episode_id)
    segments = repository.episode_segments(session, episode_id)
    prompt = sum(len(s.prompt_ids) for s in segments if s.role == "organizer")
    completion = sum(s.generated_tokens for s in segments)
    organizer = next((s.text for s in segments if s.agent == "organizer"), None)
    usage = Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        critical_path_tokens=episode.latency if episode is not None else None,
    )
    return episode, usage, organizer


def _info(episode: Episode) -> AsyncThinkInfo:
    return AsyncThinkInfo(
        status=episode.status,
        mode=episode.mode,
        capacity=episode.capacity,
        latency=episode.latency,
        eta=episode.eta,
        eta_over_c=episode.eta_over_c,
        wall_time_s=episode.wall_time_s,
        forks=episode.forks,
        accuracy=episode.accuracy,
        reward=episode.reward_total,
        format_errors=list(episode.format_errors or []),
    )


def _finish_reason(episode: Episode) -> FinishReason:
    kinds = {str(e.get("kind")) for e in episode.format_errors or []}
    return "length" if "budget_exceeded" in kinds else "stop"


async def _result(state: GatewayState, episode_id: str) -> _Finished:
    """The finished episode, its usage and organizer text; OpenAIError when it failed or vanished."""
    await wait_finished(state, episode_id)
    episode, usage, organizer = await in_thread(state.session_factory, lambda s: _load(s, episode_id))
    if episode is None:
        raise OpenAIError(
            502, f"episode {episode_id} is no longer stored", type="server_error", code="episode_missing"
        )
    if episode.status == EpisodeStatus.FAILED:
        raise OpenAIError(
            502,
            f"episode {episode_id} failed: {scrub(episode.error) or 'unknown error'}",
            type="server_error",
            code="episode_failed",
        )
    return _Finished(episode, usage, organizer)


def _timeout(episode_id: str, timeout_s: float) -> OpenAIError:
    return OpenAIError(
        504,
        f"episode {episode_id} did not finish within {timeout_s:g}s; it keeps running: poll "
        f"GET /v1/episodes/{episode_id} or raise timeout_s",
        type="timeout",
        code="episode_timeout",
    )


async def _wait(state: GatewayState, episode_id: str, timeout_s: float) -> None:
    try:
        async with asyncio.timeout(timeout_s), aclosing(follow_events(state, episode_id)) as events:
            async for _ in events:
                pass
    except TimeoutError:
        raise _timeout(episode_id, timeout_s) from None


# ----------------------------------------------------------------------------- the endpoint
@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    summary="Chat completion that runs an AsyncThink episode (OpenAI-compatible)",
    description=(
        "The last user message is the problem; the model name picks the task. Runs one episode and answers "
        "with its answer, the episode id (`id` = `chatcmpl-<episode_id>` and `episode_id`) and its metrics "
        "(`asyncthink`). `stream=true` answers `chat.completion.chunk` SSE chunks ending with `data: [DONE]`."
    ),
    responses={
        **ERRORS,
        200: {"content": {"text/event-stream": {}}, "description": "The completion, or its chunks."},
    },
)
async def chat_completions(
    body: ChatCompletionRequest, state: StateDep, principal: SubmitKey
) -> Response | ChatCompletion:
    model_task = state.chat_models.get(body.model)
    if model_task is None:
        raise _unknown_model(state, body.model)
    try:
        task, payload = request_task(model_task, body.messages)
    except ValueError as err:
        raise OpenAIError(400, str(err), param="messages", code="invalid_value") from err
    settings = body.episode_settings()
    if body.stream:
        settings = settings.model_copy(update={"stream_text": True})
    try:
        problem = problem_from_request(task, payload, body.problem_id)
        episode_id = await submit_episode(
            state,
            problem=problem,
            settings=settings,
            model=None,
            api="chat",
            explicit_id=body.problem_id is not None,
            api_key_id=principal.key_id,
        )
    except SubmissionError as err:
        if err.param == "payload":
            err.param = "messages"
        raise OpenAIError.from_submission(err) from err
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _stream(state, episode_id, body.model, created, body.timeout_s, include_usage)
        return StreamingResponse(chunks, media_type="text/event-stream", headers=SSE_HEADERS)
    await _wait(state, episode_id, body.timeout_s)
    done = await _result(state, episode_id)
    message = AssistantMessage(content=done.content, reasoning_content=done.organizer_text)
    return ChatCompletion(
        id=f"chatcmpl-{episode_id}",
        created=created,
        model=body.model,
        choices=[Choice(message=message, finish_reason=_finish_reason(done.episode))],
        usage=done.usage,
        system_fingerprint=done.episode.model_version,
        episode_id=episode_id,
        asyncthink=_info(done.episode),
    )


def _data(obj: ChatCompletionChunk | dict[str, Any]) -> bytes:
    text = obj.model_dump_json() if isinstance(obj, ChatCompletionChunk) else json.dumps(obj)
    return f"data: {text}\n\n".encode()


async def _stream(
    state: GatewayState, episode_id: str, model: str, created: int, timeout_s: float, include_usage: bool
) -> AsyncIterator[bytes]:
    def chunk(delta: Delta, finish: FinishReason | None = None, **extra: Any) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=f"chatcmpl-{episode_id}",
            created=created,
            model=model,
            choices=[ChunkChoice(delta=delta, finish_reason=finish)],
            episode_id=episode_id,
            **extra,
        )

    yield _data(chunk(Delta(role="assistant", content="")))
    sent_answer = False
    try:
        async with asyncio.timeout(timeout_s), aclosing(follow_events(state, episode_id)) as events:
            async for item in events:
                event = item.event
                if event is None:
                    yield sse_comment("heartbeat")
                elif event.agent != "organizer":
                    continue
                elif event.kind is EventKind.TEXT:
                    yield _data(chunk(Delta(reasoning_content=str(event.data.get("text", "")))))
                elif event.kind is EventKind.ANSWER and not sent_answer:
                    sent_answer = True
                    yield _data(chunk(Delta(content=str(event.data.get("text", "")))))
        done = await _result(state, episode_id)
    except TimeoutError:
        yield _data(_timeout(episode_id, timeout_s).body())
        yield b"data: [DONE]\n\n"
        return
    except OpenAIError as err:
        yield _data(err.body())
        yield b"data: [DONE]\n\n"
        return
    if not sent_answer and done.content:
        yield _data(chunk(Delta(content=done.content)))
    yield _data(chunk(Delta(), _finish_reason(done.episode), asyncthink=_info(done.episode)))
    if include_usage:
        yield _data(
            ChatCompletionChunk(
                id=f"chatcmpl-{episode_id}",
                created=created,
                model=model,
                choices=[],
                usage=done.usage,
                episode_id=episode_id,
            )
        )
    yield b"data: [DONE]\n\n"
