"""Episodes as timelines: ``/ui/episodes`` (the ones you may see) and ``/ui/episodes/{id}`` (one episode,
live while it runs).

The page draws the episode in organizer-token time (lanes, forks and joins as arrows, the critical path
highlighted) and in wall time (``…/timeline?view=tokens|wall``, an SVG the page reloads as events arrive),
with its plans (proposed, approved, the diff, and where the run left the plan) and its human tasks' audit.
A running episode is drawn from its live events; a finished one from its stored timeline.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from fastapi.responses import HTMLResponse, Response

from services.gateway.deps import StateDep
from services.gateway.human.common import SECURITY_HEADERS, render
from services.gateway.human.deps import ActionPerson, PagePerson, PagesDep
from services.gateway.human.svg import render_svg
from services.gateway.human.views import goal_of, in_thread, visible_episode
from shared.plans import Plan, deviations, plan_diff, plan_from_text
from shared.trace import TraceLayout, stored_layout

router = APIRouter(prefix="/ui", include_in_schema=False)

EpisodeId = Annotated[str, Path(min_length=1, max_length=64)]


@router.get("/episodes")
async def episodes_page(person: PagePerson, pages: PagesDep, state: StateDep) -> Response:
    from sqlalchemy import or_, select

    from shared.store.models import Episode, HumanTask

    def load(session: Any) -> list[Any]:
        stmt = select(Episode).order_by(Episode.created_at.desc()).limit(100)
        if not person.admin:
            given = select(HumanTask.episode_id)
            if person.pools is not None:
                given = given.where(HumanTask.pool.in_(person.pools))
            stmt = stmt.where(or_(Episode.api_key_id == person.key_id, Episode.id.in_(given)))
        return list(session.scalars(stmt).all())

    rows = await in_thread(state.session_factory, load)
    return render(pages, "episodes.html", person=person, active="episodes", episodes=rows)


async def _layout(pages: Any, state: Any, episode: Any) -> TraceLayout:
    if episode.status in ("pending", "running"):
        feed = await pages.feeds.get(episode.id)
        return feed.trace.layout()
    from shared.store import repository

    segments = await in_thread(state.session_factory, lambda s: repository.episode_segments(s, episode.id))
    return stored_layout(episode.timeline, segments, mode=episode.mode)


@router.get("/episodes/{episode_id}")
async def episode_page(episode_id: EpisodeId, person: PagePerson, pages: PagesDep, state: StateDep) -> Response:
    from shared.store import people, repository

    def load(session: Any) -> tuple[Any, list[Any], list[Any], list[Any]]:
        episode = visible_episode(session, person, episode_id)
        return (
            episode,
            repository.episode_segments(session, episode_id),
            people.plans_of_episode(session, episode_id),
            people.audit(session, episode_id=episode_id),
        )

    episode, segments, plans, audit = await in_thread(state.session_factory, load)
    feed = await pages.feeds.get(episode_id)
    layout = await _layout(pages, state, episode)
    plan_view = None
    if plans:
        row = plans[0]
        proposed = Plan.model_validate(row.proposed)
        approved = Plan.model_validate(row.approved) if row.approved else proposed
        organizer = next((s for s in segments if s.role == "organizer"), None)
        ran = None
        if organizer is not None and organizer.text:
            ran = plan_from_text(organizer.text)
            routed = {s.fork_id: s.endpoint for s in segments if s.role == "worker" and s.parent == "organizer"}
            ran = Plan(steps=tuple(
                st.model_copy(update={"endpoint": routed.get(st.fork_id, st.endpoint)}) if st.kind == "fork" else st
                for st in ran.steps
            ))
        plan_view = {
            "proposed": proposed, "approved": approved, "diff": plan_diff(proposed, approved),
            "deviations": deviations(approved, ran) if ran is not None else None, "row": row,
        }
    return render(
        pages, "episode.html", person=person, active="episodes", episode=episode, goal=goal_of(episode),
        segments=segments, audit=audit, plan=plan_view, feed=feed,
        tokens_svg=render_svg(layout, "tokens"), wall_svg=render_svg(layout, "wall"), layout=layout,
    )


@router.get("/episodes/{episode_id}/timeline")
async def timeline(
    episode_id: EpisodeId, person: ActionPerson, pages: PagesDep, state: StateDep,
    view: Annotated[str, Query(pattern="^(tokens|wall)$")] = "tokens",
) -> Response:
    episode = await in_thread(state.session_factory, lambda s: visible_episode(s, person, episode_id))
    layout = await _layout(pages, state, episode)
    return HTMLResponse(render_svg(layout, view), headers=SECURITY_HEADERS | {"X-Episode-Status": episode.status})
