"""``GET /v1/episodes/{id}`` (one episode with its segments) and ``GET /v1/episodes`` (filter, paginate).

Both are plain ``def`` routes: FastAPI runs them, and their database session, in a worker thread.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Path, Query

from services.gateway.auth import ReadKey
from services.gateway.deps import SessionDep
from services.gateway.errors import scrub
from services.gateway.schemas import EpisodeDetail, EpisodeList, SegmentDetail
from shared.messages import EpisodeStatus
from shared.store import repository
from shared.store.schemas import EpisodePublic, EpisodeSummary, SegmentPublic
from shared.tasks.base import Mode

router = APIRouter(prefix="/v1", tags=["episodes"])

TaskName = Literal["countdown", "sudoku", "math", "chat"]
MAX_OFFSET = 1_000_000_000  # SQLite and PostgreSQL take 64-bit offsets; nobody pages this far
EpisodeId = Annotated[str, Path(min_length=1, max_length=64, description="The episode id.")]


@router.get(
    "/episodes/{episode_id}",
    response_model=EpisodeDetail,
    name="get_episode",
    summary="One episode",
    description=(
        "Status, answer, reward parts (accuracy R_A, concurrency R_η, total R), critical-path latency T, "
        "concurrency η and η/c, wall time, format errors, and every segment with its text and token counts. "
        "`include_tokens=true` adds the token ids and masks (1 = generated, 0 = injected by a Join)."
    ),
    responses={404: {"description": "No episode with that id."}},
)
def get_episode(
    episode_id: EpisodeId,
    session: SessionDep,
    principal: ReadKey,
    include_tokens: Annotated[bool, Query(description="Add token ids and masks to each segment.")] = False,
) -> EpisodeDetail:
    episode = repository.get_episode(session, episode_id)
    if episode is None or not principal.may_see(episode.api_key_id):  # another key's: as if missing
        raise HTTPException(404, detail=f"no episode {episode_id!r}; list episodes with GET /v1/episodes")
    public = EpisodePublic.from_row(episode, include_segments=False)
    segments = [
        SegmentDetail.from_public(SegmentPublic.model_validate(row), include_tokens=include_tokens)
        for row in repository.episode_segments(session, episode_id)
    ]
    for segment in segments:
        segment.error = scrub(segment.error)
    data = public.model_dump(exclude={"segments"}) | {"error": scrub(public.error)}
    return EpisodeDetail(**data, segments=segments)


@router.get(
    "/episodes",
    response_model=EpisodeList,
    summary="List episodes",
    description="Newest first; filter by task, mode, status and model version; page with limit and offset. "
    "Lists the episodes the caller's key submitted (every episode for an admin key).",
)
def list_episodes(
    session: SessionDep,
    principal: ReadKey,
    task: Annotated[TaskName | None, Query(description="Only this task.")] = None,
    mode: Annotated[Mode | None, Query(description="Only this mode.")] = None,
    status: Annotated[EpisodeStatus | None, Query(description="Only this status.")] = None,
    model_version: Annotated[
        str | None, Query(max_length=255, description="Only this weight version.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200, description="Page size, 1 to 200.")] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Episodes to skip.")] = 0,
) -> EpisodeList:
    rows, total = repository.list_episodes(
        session,
        task=task,
        mode=mode,
        status=status,
        model_version=model_version,
        api_key_id=principal.owner_filter,
        limit=limit,
        offset=offset,
    )
    return EpisodeList(
        items=[EpisodeSummary.model_validate(r) for r in rows], total=total, limit=limit, offset=offset
    )
