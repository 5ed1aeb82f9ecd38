"""Sign-in, the inbox, and a person's actions on a human task (claim, renew, release, submit, undo).

Actions answer JSON: ``{"task": ...}`` on success, 409 ``{"detail", "reason"}`` when the transition did
not happen (someone else holds the task, your claim lapsed, the deadline passed, you already submitted,
the undo window is over...). Every action is a single conditional update in the store
(:mod:`shared.store.people`) and is published as a notice on the queue stream, so every open page and the
waiting join hear of it.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from services.gateway.deps import StateDep
from services.gateway.human.common import announce, conflict, fragment, render, safe_next, secure
from services.gateway.human.deps import ActionPerson, PagePerson, PagesDep, form, session_person
from services.gateway.human.session import (
    COOKIE_PATH,
    LOGIN_COOKIE,
    LOGIN_S,
    SESSION_COOKIE,
    SESSION_S,
    csrf_ok,
    login_token,
    new_person,
)
from services.gateway.human.views import in_thread, inbox, task_view, visible_episode
from shared.auth import BOOTSTRAP_ADMIN_ID, Scope

router = APIRouter(prefix="/ui", include_in_schema=False)

TaskId = Annotated[str, Path(min_length=1, max_length=32, pattern=r"^[0-9a-f]+$")]
MAX_ANSWER_CHARS = 20_000


@router.get("")
async def home(_: PagePerson) -> RedirectResponse:
    return RedirectResponse("/ui/inbox", status_code=303)


@router.get("/login")
async def login_page(request: Request, pages: PagesDep, next: str | None = None) -> Response:
    if await session_person(request, pages) is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    token, cookie = login_token(pages.signer)
    response = render(pages, "login.html", person=None, csrf=token, next=safe_next(next), error=None)
    response.set_cookie(LOGIN_COOKIE, cookie, max_age=LOGIN_S, path=COOKIE_PATH, httponly=True, samesite="lax",
                        secure=secure(request, pages))
    return response


@router.post("/login")
async def login(request: Request, pages: PagesDep, state: StateDep) -> Response:
    values = await form(request)
    next_url = safe_next(values.get("next"))
    ticket = pages.signer.load("login", request.cookies.get(LOGIN_COOKIE))
    if ticket is None or not csrf_ok(str(ticket.get("t", "")), values.get("csrf")):
        raise HTTPException(403, detail="the sign-in form expired or was not sent from this site: reload it")
    verifier = state.verifier or pages.verifier
    principal = await verifier.verify(values.get("key", "").strip())
    error = None
    if principal is None:
        error = "That key is not valid (or was revoked)."
    elif not principal.has(Scope.HUMAN):
        error = "That key has no human scope: create one with `asyncthink keys create --scope human`."
    if error is not None or principal is None:
        token, cookie = login_token(pages.signer)
        refused = render(pages, "login.html", person=None, csrf=token, next=next_url, error=error, status=401)
        refused.set_cookie(LOGIN_COOKIE, cookie, max_age=LOGIN_S, path=COOKIE_PATH, httponly=True,
                           samesite="lax", secure=secure(request, pages))
        return refused
    key_id = principal.key_id or BOOTSTRAP_ADMIN_ID
    pools: list[str] | None = None
    if key_id != BOOTSTRAP_ADMIN_ID and not principal.is_admin:
        _, pools = await pages.liveness.pools(key_id)
    person = new_person(key_id, principal.name, admin=principal.is_admin, pools=pools)
    response = RedirectResponse(next_url, status_code=303)
    response.set_cookie(SESSION_COOKIE, pages.signer.sign("session", person.to_json()), max_age=SESSION_S,
                        path=COOKIE_PATH, httponly=True, samesite="lax", secure=secure(request, pages))
    response.delete_cookie(LOGIN_COOKIE, path=COOKIE_PATH)
    return response


@router.post("/logout")
async def logout(_: ActionPerson) -> Response:
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH)
    return response


# ----------------------------------------------------------------------------- the inbox
@router.get("/inbox")
async def inbox_page(person: PagePerson, pages: PagesDep, state: StateDep, task: str | None = None) -> Response:
    cards = await inbox(pages, state.session_factory, person)
    held = next((t for c in cards for t in c.tasks if t.mine and t.state in ("yours", "submitted")), None)
    return render(pages, "inbox.html", person=person, active="inbox", cards=cards, held=held, selected=task,
                  config=pages.config)


@router.get("/inbox/list")
async def inbox_list(person: ActionPerson, pages: PagesDep, state: StateDep) -> Response:
    cards = await inbox(pages, state.session_factory, person)
    return fragment(pages, "_inbox_list.html", person=person, cards=cards)


@router.get("/tasks/{task_id}/work")
async def workbench(task_id: TaskId, person: ActionPerson, pages: PagesDep, state: StateDep) -> Response:
    """The answer panel of a task you hold (or just submitted)."""
    from shared.store import people

    def load(session: Any) -> Any:
        row = people.get_task(session, task_id)
        if row is None or not person.sees_pool(row.pool):
            raise HTTPException(404, detail="no such task in your pools")
        episode = visible_episode(session, person, row.episode_id)
        return row, episode

    row, episode = await in_thread(state.session_factory, load)
    view = task_view(row, person)
    from services.gateway.human.views import goal_of

    return fragment(pages, "_workbench.html", person=person, task=view, goal=goal_of(episode), config=pages.config)


def _task_json(row: Any, person: Any) -> dict[str, Any]:
    view = task_view(row, person)
    return {
        "id": view.id, "episode_id": view.episode_id, "status": view.status, "state": view.state,
        "lease_left": view.lease_left, "deadline_left": view.deadline_left, "undo_left": view.undo_left,
        "draft": view.draft, "claimed_by": view.claimed_by_name,
    }


async def _act(request: Request, person: Any, pages: Any, state: Any, task_id: str, action: str) -> Response:
    from shared.store import people
    from shared.store.people import Actor, QueueConflict

    values = await form(request)
    actor = Actor(person.key_id, person.name)
    cfg = pages.config
    draft = values.get("draft")
    if draft is not None and len(draft) > MAX_ANSWER_CHARS:
        raise HTTPException(422, detail=f"an answer is at most {MAX_ANSWER_CHARS} characters")

    def run(session: Any) -> Any:
        row = people.get_task(session, task_id)
        if row is None or not person.sees_pool(row.pool):
            raise HTTPException(404, detail="no such task in your pools")
        if action == "claim":
            return people.claim(session, task_id=task_id, actor=actor, lease_s=cfg.lease_s)
        if action == "renew":
            return people.renew(session, task_id=task_id, actor=actor, lease_s=cfg.lease_s, draft=draft)
        if action == "release":
            reason = (values.get("reason") or "released")[:64]
            return people.release(session, task_id=task_id, actor=actor, reason=reason, draft=draft)
        if action == "submit":
            answer = (values.get("answer") or "").strip()
            if not answer:
                raise HTTPException(422, detail="the answer is empty")
            return people.submit(session, task_id=task_id, actor=actor, answer=answer, undo_s=cfg.undo_s)
        return people.undo(session, task_id=task_id, actor=actor, lease_s=cfg.lease_s)

    try:
        row = await in_thread(state.session_factory, run)
    except QueueConflict as err:
        return conflict(err.reason, str(err))
    if action != "renew":
        await announce(state.bus, action, row, person)
    return JSONResponse({"task": _task_json(row, person)}, headers={"Cache-Control": "no-store"})


@router.post("/tasks/{task_id}/claim")
async def claim(task_id: TaskId, request: Request, person: ActionPerson, pages: PagesDep, state: StateDep) -> Response:
    return await _act(request, person, pages, state, task_id, "claim")


@router.post("/tasks/{task_id}/renew")
async def renew(task_id: TaskId, request: Request, person: ActionPerson, pages: PagesDep, state: StateDep) -> Response:
    return await _act(request, person, pages, state, task_id, "renew")


@router.post("/tasks/{task_id}/release")
async def release(task_id: TaskId, request: Request, person: ActionPerson, pages: PagesDep, state: StateDep) -> Response:
    return await _act(request, person, pages, state, task_id, "release")


@router.post("/tasks/{task_id}/submit")
async def submit(task_id: TaskId, request: Request, person: ActionPerson, pages: PagesDep, state: StateDep) -> Response:
    return await _act(request, person, pages, state, task_id, "submit")


@router.post("/tasks/{task_id}/undo")
async def undo(task_id: TaskId, request: Request, person: ActionPerson, pages: PagesDep, state: StateDep) -> Response:
    return await _act(request, person, pages, state, task_id, "undo")
