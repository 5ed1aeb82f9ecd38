"""The human organizer's pages: start an episode on any task with yourself as its organizer, then write it.

``POST /ui/organize`` stores and queues an episode whose organizer is the signed-in person
(``SubmitProblem.organizer = "human"``, text streamed, workers given an hour). ``/ui/organize/{id}`` shows
the organizer's text so far, each worker's lane with its tokens as they come, and a composer: think (plain
text), fork a sub-query to the model, the python tool or people, join an open fork, answer. Each piece goes
to the episode's organizer (:func:`services.human.organizer.send_text`), which acts on it exactly as on a
model's text. Only the person who started the episode (or an admin) may write it.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from services.gateway.deps import StateDep
from services.gateway.errors import SubmissionError
from services.gateway.human.common import render
from services.gateway.human.deps import ActionPerson, PagePerson, PagesDep, form
from services.gateway.human.forms import TASKS, FormError, ProblemForm
from services.gateway.human.views import goal_of, in_thread, visible_episode
from services.gateway.submission import submit_episode
from services.human.organizer import give_up, send_text

router = APIRouter(prefix="/ui", include_in_schema=False)

EpisodeId = Annotated[str, Path(min_length=1, max_length=64)]
MAX_PIECE_CHARS = 20_000


@router.get("/organize")
async def organize_new(person: PagePerson, pages: PagesDep) -> Response:
    return render(pages, "organize_new.html", person=person, active="organize", form=ProblemForm(), tasks=TASKS,
                  error=None)


@router.post("/organize")
async def organize_start(request: Request, person: ActionPerson, pages: PagesDep, state: StateDep) -> Response:
    values = ProblemForm.of(await form(request))
    try:
        problem, settings = values.build()
        episode_id = await submit_episode(
            state, problem=problem, settings=settings, model=None, api="human-organizer",
            api_key_id=person.key_id, organizer="human",
        )
    except (FormError, SubmissionError) as err:
        message = err.message if isinstance(err, SubmissionError) else str(err)
        return render(pages, "organize_new.html", person=person, active="organize", form=values, tasks=TASKS,
                      error=message, status=422)
    return RedirectResponse(f"/ui/organize/{episode_id}", status_code=303)


def _own(session: Any, person: Any, episode_id: str) -> Any:
    episode = visible_episode(session, person, episode_id)
    if (episode.config or {}).get("organizer") != "human":
        raise HTTPException(409, detail="a model organizes this episode")
    if not (person.admin or episode.api_key_id == person.key_id):
        raise HTTPException(403, detail="only the person who started this episode writes its organizer")
    return episode


@router.get("/organize/{episode_id}")
async def organize_page(episode_id: EpisodeId, person: PagePerson, pages: PagesDep, state: StateDep) -> Response:
    episode = await in_thread(state.session_factory, lambda s: _own(s, person, episode_id))
    feed = await pages.feeds.get(episode_id)
    return render(
        pages, "organize.html", person=person, active="organize", episode=episode, goal=goal_of(episode), feed=feed,
        endpoints=pages.endpoint_names(), capacity=episode.capacity,
    )


@router.post("/organize/{episode_id}/write")
async def organize_write(
    episode_id: EpisodeId, request: Request, person: ActionPerson, state: StateDep
) -> Response:
    values = await form(request)
    text = values.get("text", "")
    if not text:
        raise HTTPException(422, detail="nothing to send")
    if len(text) > MAX_PIECE_CHARS:
        raise HTTPException(422, detail=f"send at most {MAX_PIECE_CHARS} characters at a time")
    episode = await in_thread(state.session_factory, lambda s: _own(s, person, episode_id))
    if episode.status not in ("pending", "running"):
        raise HTTPException(409, detail=f"the episode is {episode.status}")
    entry = await send_text(state.bus, episode_id, text, by=person.key_id)
    return JSONResponse({"sent": len(text), "entry": entry}, status_code=202)


@router.post("/organize/{episode_id}/give-up")
async def organize_give_up(episode_id: EpisodeId, person: ActionPerson, state: StateDep) -> Response:
    await in_thread(state.session_factory, lambda s: _own(s, person, episode_id))
    await give_up(state.bus, episode_id, by=person.key_id)
    return JSONResponse({"given_up": True}, status_code=202)
