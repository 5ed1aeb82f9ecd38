"""``GET /ui/stream``: one Server-Sent Events stream per page, for the queue and the episodes it shows.

* ``queue`` events: the human queue's notices (new tasks, claims, releases, lease expiries, submits,
  undos, consumptions, deadlines, fallbacks) of the person's pools, with ``?queue=1``;
* ``episode`` events: the events of each episode followed with ``?follow=EPISODE_ID:AFTER`` (repeatable;
  ``AFTER`` is the stream position the page was rendered at, ``0`` for everything): the organizer's and the
  AI workers' tokens as they are generated (``text``), forks, joins, results, returns, the answer and the
  end. Each carries ``episode_id``, ``kind``, ``agent``, ``clock`` and ``data``.

Every followed episode must be one the person may see (else 404, as for a missing one); at most
``MAX_FOLLOW`` at once. One reader task per stream merges into the response (each stops at the end of the response,
within one blocking read); a heartbeat comment every
``sse_heartbeat_s`` keeps proxies from closing an idle stream.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import StreamingResponse

from services.gateway.deps import StateDep
from services.gateway.human.deps import ActionPerson, PagesDep
from services.gateway.human.session import Person
from services.gateway.human.views import in_thread, visible_episode
from services.gateway.routes.events import valid_entry_id
from services.gateway.sse import SSE_HEADERS, sse_comment, sse_event
from services.human.notices import QUEUE_STREAM, recent_id
from shared.messages import EpisodeEvent, EventKind, events_stream

router = APIRouter(prefix="/ui", include_in_schema=False)

MAX_FOLLOW = 32
TEXT_CHARS = 4000  # of a text event's piece forwarded at once


def _episode_payload(episode_id: str, event: EpisodeEvent) -> dict[str, Any]:
    data = dict(event.data)
    if event.kind is EventKind.SEGMENT:
        seg = data.get("segment") or {}
        data = {"segment": {k: seg.get(k) for k in ("agent", "returned", "error", "generated_tokens", "author", "endpoint")}}
    elif event.kind is EventKind.TEXT:
        data["text"] = str(data.get("text", ""))[:TEXT_CHARS]
    return {"episode_id": episode_id, "kind": event.kind, "agent": event.agent, "clock": event.clock, "data": data,
            "ts": event.ts}


Out = asyncio.Queue[tuple[str, str | None, str]]


async def _pump_queue(state: Any, person: Person, out: Out, stop: asyncio.Event) -> None:
    after = recent_id()
    while not stop.is_set():
        try:
            entries = await state.bus.read(QUEUE_STREAM, after=after, count=200, block_ms=5000)
        except Exception:
            await asyncio.sleep(1.0)
            continue
        for entry in entries:
            after = entry.id
            try:
                data = json.loads(entry.fields.get("data", "{}"))
            except ValueError:
                continue
            if person.sees_pool(str(data.get("pool", ""))) or person.admin:
                await out.put(("queue", None, json.dumps(data)))


async def _pump_episode(state: Any, episode_id: str, after: str, out: Out, stop: asyncio.Event) -> None:
    stream = events_stream(episode_id)
    while not stop.is_set():
        try:
            entries = await state.bus.read(stream, after=after, count=200, block_ms=5000)
        except Exception:
            await asyncio.sleep(1.0)
            continue
        for entry in entries:
            after = entry.id
            try:
                event = EpisodeEvent.model_validate_json(entry.fields.get("data", ""))
            except ValueError:
                continue
            await out.put(("episode", f"{episode_id}:{entry.id}", json.dumps(_episode_payload(episode_id, event))))
            if event.kind is EventKind.FINISHED:
                return


@router.get("/stream")
async def stream(
    request: Request,
    person: ActionPerson,
    pages: PagesDep,
    state: StateDep,
    queue: bool = False,
    follow: Annotated[list[str] | None, Query(max_length=MAX_FOLLOW)] = None,
) -> StreamingResponse:
    wanted: dict[str, str] = {}
    for item in follow or []:
        episode_id, _, after = item.partition(":")
        after = after or "0"
        if not episode_id or len(episode_id) > 64 or not valid_entry_id(after):
            raise HTTPException(422, detail=f"follow takes EPISODE_ID:AFTER, got {item[:80]!r}")
        wanted[episode_id] = after

    def check(session: Any) -> None:
        for episode_id in wanted:
            visible_episode(session, person, episode_id)

    await in_thread(state.session_factory, check)
    heartbeat = state.sse_heartbeat_s

    async def body() -> AsyncIterator[bytes]:
        out: Out = asyncio.Queue(maxsize=10_000)
        stop = asyncio.Event()
        tasks = [asyncio.create_task(_pump_episode(state, eid, after, out, stop)) for eid, after in wanted.items()]
        if queue:
            tasks.append(asyncio.create_task(_pump_queue(state, person, out, stop)))
        try:
            yield sse_comment(f"{len(wanted)} episodes{', the queue' if queue else ''}")
            while True:
                try:
                    kind, entry_id, data = await asyncio.wait_for(out.get(), heartbeat)
                except TimeoutError:
                    if await request.is_disconnected():
                        return
                    yield sse_comment("heartbeat")
                    continue
                yield sse_event(data, event=kind, id=entry_id)
        finally:
            stop.set()  # the readers also leave by themselves within one blocking read
            for task in tasks:
                task.cancel()

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)
