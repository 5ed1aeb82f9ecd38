"""``GET /v1/episodes/{id}/events``: an episode's events as Server-Sent Events, live or replayed.

Each SSE event has ``id:`` = the bus stream entry id, ``event:`` = the event kind (started, fork, join,
worker_result, answer, format_error, segment, failed, finished) and ``data:`` = the
:class:`~shared.messages.EpisodeEvent` as JSON. The stream ends after ``finished``. A client that
reconnects with ``Last-Event-ID`` resumes after that entry; once nothing is left of a finished
episode the answer is 204, which tells a browser's ``EventSource`` to stop reconnecting. While the
episode is idle a heartbeat comment is sent every ``sse_heartbeat_s`` seconds.

Limits: events are read from the bus, which keeps a bounded number per episode (the organizer trims
the stream); if they are gone, a single ``finished`` event built from the stored row is sent.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Response
from fastapi.responses import StreamingResponse

from services.gateway.auth import ReadKey
from services.gateway.deps import StateDep
from services.gateway.errors import scrub
from services.gateway.routes.episodes import EpisodeId
from services.gateway.sse import SSE_HEADERS, sse_comment, sse_event
from services.gateway.submission import follow_events, stored_status
from shared.messages import EpisodeStatus, events_stream

router = APIRouter(prefix="/v1", tags=["episodes"])

_ENTRY_ID = re.compile(r"^(\d{1,20})(?:-(\d{1,20}))?$")
MAX_ENTRY_PART = 2**64 - 1  # a stream entry id is two unsigned 64-bit integers


def valid_entry_id(value: str) -> bool:
    """Whether ``value`` is a stream entry id Redis accepts (``ms`` or ``ms-seq``, each below 2**64)."""
    match = _ENTRY_ID.match(value)
    return match is not None and all(int(p) <= MAX_ENTRY_PART for p in match.groups() if p is not None)


@router.get(
    "/episodes/{episode_id}/events",
    name="episode_events",
    summary="Follow an episode (Server-Sent Events)",
    description=(
        "`text/event-stream` of the episode's events as they happen: `id` is the stream entry id, `event` "
        "the kind, `data` the EpisodeEvent JSON. Ends after `finished`. Send `Last-Event-ID` (or `after`) "
        "to resume; 204 when a finished episode has nothing left after it."
    ),
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "The event stream."},
        204: {"description": "Finished, and nothing after Last-Event-ID."},
        404: {"description": "No episode with that id."},
    },
)
async def episode_events(
    episode_id: EpisodeId,
    state: StateDep,
    principal: ReadKey,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=64)] = None,
    after: Annotated[
        str | None, Query(max_length=64, description="Resume after this entry id (like Last-Event-ID).")
    ] = None,
) -> Response:
    start = last_event_id or after or "0"
    if not valid_entry_id(start):
        raise HTTPException(
            422,
            detail=f"bad Last-Event-ID {start[:48]!r}: expected a stream entry id like '1716-0' "
            "(two integers below 2**64)",
        )
    row = await stored_status(state, episode_id)
    if row is None or not principal.may_see(row.api_key_id):  # another key's: as if missing
        raise HTTPException(404, detail=f"no episode {episode_id!r}; list episodes with GET /v1/episodes")
    finished = start != "0" and EpisodeStatus(row.status).finished
    if finished and not await state.bus.read(events_stream(episode_id), after=start, count=1, block_ms=0):
        return Response(status_code=204)

    async def stream() -> AsyncIterator[bytes]:
        yield sse_comment(f"episode {episode_id}")
        async for item in follow_events(state, episode_id, after=start):
            if item.event is None:
                yield sse_comment("heartbeat")
            else:
                event = item.event
                if isinstance(event.data.get("error"), str):
                    event = event.model_copy(update={"data": event.data | {"error": scrub(event.data["error"])}})
                yield sse_event(event.model_dump_json(), event=event.kind, id=item.entry_id)

    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)
