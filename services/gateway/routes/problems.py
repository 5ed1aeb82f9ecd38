"""``POST /v1/problems``: submit a problem; the episode runs asynchronously (202 + episode id)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError

from services.gateway.auth import SubmitKey
from services.gateway.deps import StateDep
from services.gateway.errors import SubmissionError
from services.gateway.schemas import EpisodeLinks, ProblemAccepted, ProblemCreate
from services.gateway.submission import problem_from_request, submit_episode

router = APIRouter(prefix="/v1", tags=["problems"])


@router.post(
    "/problems",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ProblemAccepted,
    summary="Submit a problem",
    description=(
        "Validates the request (bounds, then the task's own payload check), stores a pending episode and "
        "queues it for an organizer. Poll `links.self` or follow `links.events` (SSE) for the result. "
        "422: invalid input (or a model that is not served), nothing stored. 409: the problem_id is already "
        "bound to another payload (problems are immutable). 503: the database or the bus failed (a stored "
        "row is marked failed)."
    ),
    responses={
        409: {"description": "The problem_id is bound to another payload; nothing was stored."},
        422: {"description": "Invalid input; nothing was stored."},
        503: {"description": "Not queued."},
    },
)
async def create_problem(
    body: ProblemCreate, state: StateDep, request: Request, principal: SubmitKey
) -> ProblemAccepted:
    try:
        problem = problem_from_request(body.task, body.payload, body.problem_id)
        episode_id = await submit_episode(
            state,
            problem=problem,
            settings=body.episode_settings(),
            model=body.model,
            api="problems",
            explicit_id=body.problem_id is not None,
            api_key_id=principal.key_id,
        )
    except SubmissionError as err:
        if err.status == 422:
            loc = ("body", err.param) if err.param else ("body",)
            raise RequestValidationError([{"type": "value_error", "loc": loc, "msg": err.message}]) from err
        raise HTTPException(err.status, detail=err.message) from err
    return ProblemAccepted(
        episode_id=episode_id,
        links=EpisodeLinks(
            self=str(request.url_for("get_episode", episode_id=episode_id).path),
            events=str(request.url_for("episode_events", episode_id=episode_id).path),
        ),
    )
