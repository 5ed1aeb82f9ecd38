"""Planning together: the model proposes a fork/join skeleton, a person edits and approves it, the episode
runs with it.

``POST /ui/plan`` asks the model for its skeleton (:func:`services.human.planner.propose_plan`: a dry run
of the organizer; nothing runs) and stores it as a draft plan. ``/ui/plans/{id}`` is the editor: add,
remove and reorder steps, rewrite a sub-query, move a branch to the model, the python tool or people, set
each branch's worker budget and the episode's budgets; ``POST …/diff`` shows how the edit differs from the
proposal and what would be refused (:func:`shared.plans.check_plan`); ``POST …/approve`` stores the
approved plan, then queues the episode with the plan in the organizer's context (once: a second approval
starts nothing). The plan row keeps both plans and the episode's id; the episode's stored config carries
the approved plan too.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import ValidationError

from services.gateway.deps import StateDep
from services.gateway.errors import SubmissionError
from services.gateway.human.common import fragment, render
from services.gateway.human.deps import ActionPerson, PagePerson, PagesDep, form
from services.gateway.human.forms import TASKS, FormError, ProblemForm
from services.gateway.human.views import in_thread
from services.gateway.submission import submit_episode
from services.human.planner import propose_plan
from shared.episode import EpisodeSettings
from shared.plans import Plan, check_plan, plan_diff
from shared.store.people import Actor
from shared.tasks import get_task

router = APIRouter(prefix="/ui", include_in_schema=False)

PlanId = Annotated[str, Path(min_length=1, max_length=32, pattern=r"^[0-9a-f]+$")]


@router.get("/plan")
async def plan_new(person: PagePerson, pages: PagesDep) -> Response:
    return render(pages, "plan_new.html", person=person, active="plan", form=ProblemForm(), tasks=TASKS, error=None)


@router.post("/plan")
async def plan_propose(request: Request, person: ActionPerson, pages: PagesDep, state: StateDep) -> Response:
    from shared.store import people

    values = ProblemForm.of(await form(request))
    try:
        problem, settings = values.build()
    except FormError as err:
        return render(pages, "plan_new.html", person=person, active="plan", form=values, tasks=TASKS, error=str(err),
                      status=422)
    backend = await pages.backend()
    proposed, text = await propose_plan(backend, problem, settings, pages.endpoint_names())

    def store(session: Any) -> Any:
        return people.create_plan(
            session, actor=Actor(person.key_id, person.name), task=problem.task, problem_id=problem.id,
            payload=problem.payload, settings=settings.model_dump(mode="json"), proposed=proposed.model_dump(mode="json"),
            proposal_text=text,
        )

    row = await in_thread(state.session_factory, store)
    return RedirectResponse(f"/ui/plans/{row.id}", status_code=303)


def _plan_row(session: Any, person: Any, plan_id: str) -> Any:
    from shared.store import people

    row = people.get_plan(session, plan_id)
    if row is None or not (person.admin or row.created_by == person.key_id):
        raise HTTPException(404, detail="no such plan of yours")
    return row


def _capacity(row: Any, settings: EpisodeSettings) -> int:
    return settings.resolved_capacity(get_task(row.task).default_capacity)


def _parse(values: dict[str, str], row: Any) -> tuple[Plan, EpisodeSettings]:
    try:
        plan = Plan.model_validate_json(values.get("plan") or "{}")
    except ValidationError as err:
        first = err.errors()[0]
        raise HTTPException(422, detail=f"the plan is malformed: {'.'.join(map(str, first['loc']))}: {first['msg']}") from err
    fields = dict(row.settings)
    for name in ("organizer_budget", "worker_budget", "capacity"):
        if values.get(name):
            try:
                fields[name] = int(values[name])
            except ValueError as err:
                raise HTTPException(422, detail=f"{name} must be a whole number") from err
    try:
        settings = EpisodeSettings(**fields)
    except ValidationError as err:
        first = err.errors()[0]
        raise HTTPException(422, detail=f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from err
    return plan, settings


@router.get("/plans/{plan_id}")
async def plan_page(plan_id: PlanId, person: PagePerson, pages: PagesDep, state: StateDep) -> Response:
    row = await in_thread(state.session_factory, lambda s: _plan_row(s, person, plan_id))
    proposed = Plan.model_validate(row.proposed)
    current = Plan.model_validate(row.approved) if row.approved else proposed
    settings = EpisodeSettings(**row.settings)
    from shared.tasks.base import Problem

    goal = get_task(row.task).organizer_prompt(
        Problem(task=row.task, id=row.problem_id, payload=row.payload), settings.mode
    ).strip()
    return render(
        pages, "plan.html", person=person, active="plan", plan=row, goal=goal, settings=settings,
        proposed_json=proposed.model_dump_json(), current_json=current.model_dump_json(),
        endpoints=pages.endpoint_names(), capacity=_capacity(row, settings),
        diff=plan_diff(proposed, current), problems=check_plan(current, capacity=_capacity(row, settings)),
    )


@router.post("/plans/{plan_id}/diff")
async def plan_check(plan_id: PlanId, request: Request, person: ActionPerson, pages: PagesDep, state: StateDep) -> Response:
    row = await in_thread(state.session_factory, lambda s: _plan_row(s, person, plan_id))
    plan, settings = _parse(await form(request), row)
    problems = check_plan(plan, capacity=_capacity(row, settings), endpoints=[None, *pages.endpoint_names()])
    return fragment(pages, "_plan_diff.html", person=person, diff=plan_diff(Plan.model_validate(row.proposed), plan),
                    problems=problems)


@router.post("/plans/{plan_id}/approve")
async def plan_approve(plan_id: PlanId, request: Request, person: ActionPerson, pages: PagesDep, state: StateDep) -> Response:
    from shared.store import people

    row = await in_thread(state.session_factory, lambda s: _plan_row(s, person, plan_id))
    if row.status == "approved":
        return RedirectResponse(f"/ui/episodes/{row.episode_id}", status_code=303)
    plan, settings = _parse(await form(request), row)
    problems = check_plan(plan, capacity=_capacity(row, settings), endpoints=[None, *pages.endpoint_names()])
    if problems:
        raise HTTPException(422, detail="the plan cannot run: " + "; ".join(problems))
    episode_id = uuid.uuid4().hex
    approved = await in_thread(
        state.session_factory,
        lambda s: people.approve_plan(s, plan_id=plan_id, approved=json.loads(plan.model_dump_json()), episode_id=episode_id),
    )
    if approved is None:  # approved meanwhile (a double click): that approval's episode runs
        row = await in_thread(state.session_factory, lambda s: _plan_row(s, person, plan_id))
        return RedirectResponse(f"/ui/episodes/{row.episode_id}", status_code=303)
    problem = get_task(row.task).problem_from_payload(row.payload, row.problem_id)
    try:
        await submit_episode(
            state, problem=problem, settings=settings, model=None, api="plan", api_key_id=person.key_id,
            episode_id=episode_id, plan=plan,
        )
    except SubmissionError as err:
        raise HTTPException(err.status, detail=err.message) from err
    return RedirectResponse(f"/ui/episodes/{episode_id}", status_code=303)
