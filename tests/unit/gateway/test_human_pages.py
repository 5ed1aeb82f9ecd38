"""The pages for people on the embedded gateway (httpx, SQLite, the in-process bus, a scripted model):
sessions and CSRF, the human queue through the pages, who may see what, the human organizer, planning.

The browser tests (tests/e2e) drive the same pages in Chromium against PostgreSQL and Redis.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.auth import Scope
from shared.backends.scripted import ScriptedBackend
from shared.plans import Plan
from shared.store import people, repository
from tests.unit.gateway.conftest import COUNTDOWN, Gateway, GatewayFactory, settings_for

ADMIN = "admin-key-for-the-human-pages-tests-0123456789"
HUMAN_FORK = "<FORK-1@human>Is 75 reachable with 25 and 50?</FORK-1>"
PLAN_TEXT = "<FORK-1>25+50</FORK-1><FORK-2>3*25</FORK-2><JOIN-1><JOIN-2><ANSWER>25+50; 3*25</ANSWER>"


def plan_following(prompt: str) -> str:
    """An organizer that does what an approved plan in its prompt says (the scripted stand-in for a model
    that follows its context), and proposes PLAN_TEXT when there is none."""
    if "Approved plan" not in prompt:
        return PLAN_TEXT
    out = []
    for line in prompt.split("Approved plan", 1)[1].splitlines():
        fork = re.match(r"- fork (\d+) → (\S+): (.*?)( \(budget \d+\))?$", line)
        join = re.match(r"- join (\d+)$", line)
        if fork:
            i, ep, q = fork.group(1), fork.group(2), fork.group(3)
            out.append(f"<FORK-{i}{'' if ep == 'model' else '@' + ep}>{q}</FORK-{i}>")
        elif join:
            out.append(f"<JOIN-{join.group(1)}>")
    return "".join(out) + "<ANSWER>as planned</ANSWER>"


def script(agent: str, prompt: str) -> str:
    if agent == "organizer":
        if "Approved plan" in prompt or "plan me" in prompt:
            return plan_following(prompt)
        return HUMAN_FORK + "Meanwhile, 3*25 = 75.<JOIN-1><ANSWER>25+50; 3*25</ANSWER>"
    return f"<RETURN>worked: {prompt.strip().splitlines()[-1][:40]}</RETURN>"


async def gateway(make_gateway: GatewayFactory, tmp_path: Path, **overrides: Any) -> Gateway:
    values: dict[str, Any] = {
        "auth": "keys", "admin_key": ADMIN, "human_undo_s": 0.2, "human_poll_s": 0.05, "human_lease_s": 5,
        "human_pools": "experts",
    }
    values.update(overrides)
    return await make_gateway(ScriptedBackend(script), settings=settings_for(tmp_path, **values))


def new_key(gw: Gateway, *scopes: Scope, pools: list[str] | None = None, name: str = "person") -> str:
    with gw.app.state.gateway.session_factory() as s:
        _, key = repository.create_api_key(s, name=name, scopes=list(scopes), pools=pools)
    return key


async def sign_in(gw: Gateway, key: str) -> httpx.AsyncClient:
    """A client of its own (its own cookies) signed in with ``key``; its CSRF token in ``headers``."""
    client = httpx.AsyncClient(transport=gw.client._transport, base_url="http://gateway")
    page = await client.get("/ui/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    r = await client.post("/ui/login", data={"key": key, "csrf": csrf, "next": "/ui/inbox"})
    assert r.status_code == 303 and r.headers["location"] == "/ui/inbox", r.text
    inbox = await client.get("/ui/inbox")
    assert inbox.status_code == 200
    client.headers["X-CSRF-Token"] = re.search(r'name="csrf" content="([^"]+)"', inbox.text).group(1)  # type: ignore[union-attr]
    return client


async def submit(gw: Gateway, key: str = ADMIN, **body: Any) -> str:
    data: dict[str, Any] = {"task": "countdown", "payload": COUNTDOWN}
    data.update(body)
    r = await gw.client.post("/v1/problems", json=data, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 202, r.text
    return str(r.json()["episode_id"])


async def wait_status(gw: Gateway, episode_id: str, timeout_s: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        with gw.app.state.gateway.session_factory() as s:
            row = repository.get_episode(s, episode_id)
        if row is not None and row.status in ("completed", "format_error", "failed"):
            return row
        assert time.monotonic() < deadline, f"episode {episode_id} is {row.status if row else 'missing'}"
        await asyncio.sleep(0.05)


async def human_task(gw: Gateway, episode_id: str, timeout_s: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with gw.app.state.gateway.session_factory() as s:
            rows = people.list_tasks(s, episode_ids=[episode_id])
        if rows:
            return rows[0]
        await asyncio.sleep(0.02)
    raise AssertionError("no human task")


def ui_routes() -> list[tuple[str, str]]:
    """Every route of the pages (the app includes these routers)."""
    from services.gateway.human import inbox, organize, plan, stream, trace

    out = []
    for route in (r for module in (inbox, organize, plan, stream, trace) for r in module.router.routes):
        path = getattr(route, "path", "")
        if path.startswith("/ui") and path not in ("/ui/login",) and not path.startswith("/ui/static"):
            for method in sorted(getattr(route, "methods", None) or ()):
                if method != "HEAD":
                    out.append((method, re.sub(r"\{[^}]+\}", "abc123", path)))
    return out


async def test_no_page_or_route_works_without_a_session(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    gw = await gateway(make_gateway, tmp_path)
    routes = ui_routes()
    assert len(routes) >= 20 and ("GET", "/ui/stream") in routes and ("POST", "/ui/tasks/abc123/submit") in routes
    forged = {"atk_session": "eyJrIjoiYWRtaW4ifQ.forged"}
    for cookies in ({}, forged):
        client = httpx.AsyncClient(transport=gw.client._transport, base_url="http://gateway", cookies=cookies)
        for method, path in routes:
            r = await client.request(method, path, data={"csrf": "x"})
            if method == "GET" and r.status_code == 303:
                assert r.headers["location"].startswith("/ui/login?next="), (path, r.headers["location"])
            else:
                assert r.status_code == 401, (method, path, r.status_code, r.text)
        await client.aclose()


async def test_sign_in_needs_a_human_key_sessions_are_signed_and_every_post_needs_csrf(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    gw = await gateway(make_gateway, tmp_path, auth_cache_s=0)
    client = httpx.AsyncClient(transport=gw.client._transport, base_url="http://gateway")
    page = await client.get("/ui/login")
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    r = await client.post("/ui/login", data={"key": new_key(gw, Scope.HUMAN), "csrf": "wrong"})
    assert r.status_code == 403
    r = await client.post("/ui/login", data={"key": new_key(gw, Scope.READ), "csrf": csrf})
    assert r.status_code == 401 and "no human scope" in r.text
    await client.aclose()

    key = new_key(gw, Scope.HUMAN)
    person = await sign_in(gw, key)
    cookie = person.cookies["atk_session"]
    assert key not in cookie and "atk_" not in cookie
    token = person.headers.pop("X-CSRF-Token")
    r = await person.post("/ui/organize", data={"task": "chat", "prompt": "hi"})
    assert r.status_code == 403 and "CSRF" in r.json()["detail"]
    r = await person.post("/ui/organize", data={"task": "chat", "prompt": "hi", "csrf": token})
    assert r.status_code == 303
    tampered = cookie[:-3] + ("AAA" if not cookie.endswith("AAA") else "BBB")
    other = httpx.AsyncClient(transport=gw.client._transport, base_url="http://gateway", cookies={"atk_session": tampered})
    assert (await other.get("/ui/inbox")).status_code == 303
    await other.aclose()
    with gw.app.state.gateway.session_factory() as s:  # a revoked key ends its sessions
        repository.revoke_api_key(s, key_id=key.split("_")[1])
    assert (await person.get("/ui/inbox")).status_code == 303
    await person.aclose()


async def test_a_fork_to_a_person_through_the_pages_exactly_once(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    gw = await gateway(make_gateway, tmp_path)
    ann, bob = await sign_in(gw, new_key(gw, Scope.HUMAN, name="Ann")), await sign_in(gw, new_key(gw, Scope.HUMAN, name="Bob"))
    eid = await submit(gw, stream_text=True)
    task = await human_task(gw, eid)
    inbox = (await ann.get("/ui/inbox/list")).text
    assert "Is 75 reachable with 25 and 50?" in inbox and f'data-task="{task.id}"' in inbox
    assert (await ann.post(f"/ui/tasks/{task.id}/claim")).status_code == 200
    r = await bob.post(f"/ui/tasks/{task.id}/claim")
    assert r.status_code == 409 and r.json()["reason"] == "taken"
    assert (await ann.post(f"/ui/tasks/{task.id}/renew", data={"draft": "ye"})).status_code == 200
    bench = await ann.get(f"/ui/tasks/{task.id}/work")
    assert "Your answer" in bench.text and ">ye</textarea>" in bench.text
    first = await ann.post(f"/ui/tasks/{task.id}/submit", data={"answer": "yes: 25+50"})
    second = await ann.post(f"/ui/tasks/{task.id}/submit", data={"answer": "yes: 25+50"})
    assert first.status_code == 200 and second.status_code == 409 and second.json()["reason"] == "already_submitted"
    row = await wait_status(gw, eid)
    assert row.status == "completed" and row.answer == "25+50; 3*25"
    with gw.app.state.gateway.session_factory() as s:
        organizer = next(seg for seg in repository.episode_segments(s, eid) if seg.role == "organizer")
        trail = [(a.action, a.actor_name) for a in people.audit(s, task_id=task.id)]
    assert organizer.text.count("<JOIN-1>yes: 25+50</JOIN-1>") == 1
    assert trail == [("created", "system"), ("claim", "Ann"), ("submit", "Ann"), ("consumed", "system")]
    page = await ann.get(f"/ui/episodes/{eid}")
    assert page.status_code == 200 and "critical path" in page.text and 'class="critical"' in page.text
    await ann.aclose()
    await bob.aclose()


async def test_a_human_key_cannot_read_episodes_it_was_not_given(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    gw = await gateway(make_gateway, tmp_path)
    key = new_key(gw, Scope.HUMAN, pools=["experts"])
    expert = await sign_in(gw, key)
    given = await submit(gw)  # forks to @human: the default pool, not the expert's
    await human_task(gw, given)
    other = await submit(gw, mode="sequential")
    for eid in (given, other):
        for path in (f"/ui/episodes/{eid}", f"/ui/episodes/{eid}/timeline", f"/ui/stream?follow={eid}:0"):
            assert (await expert.get(path)).status_code == 404, path
        r = await gw.client.get(f"/v1/episodes/{eid}", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 403
    assert "Is 75 reachable" not in (await expert.get("/ui/inbox/list")).text
    anyone = await sign_in(gw, new_key(gw, Scope.HUMAN))  # every pool: given the first, not the second
    assert (await anyone.get(f"/ui/episodes/{given}")).status_code == 200
    assert (await anyone.get(f"/ui/episodes/{other}")).status_code == 404
    listing = (await anyone.get("/ui/episodes")).text
    assert given[:12] in listing and other[:12] not in listing
    await expert.aclose()
    await anyone.aclose()


async def test_a_person_organizes_an_episode(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    gw = await gateway(make_gateway, tmp_path)
    person = await sign_in(gw, new_key(gw, Scope.HUMAN, name="Org"))
    r = await person.post("/ui/organize", data={"task": "chat", "prompt": "What is 17*23?", "capacity": "3"})
    assert r.status_code == 303
    eid = r.headers["location"].rsplit("/", 1)[1]
    page = await person.get(f"/ui/organize/{eid}")
    assert page.status_code == 200 and "What is 17*23?" in page.text
    for text in ("17*23 = 17*20 + 17*3. ", "<FORK-1@python>17*20; 17*3</FORK-1>", "<FORK-2>check 391</FORK-2>",
                 "<JOIN-1>", "<JOIN-2>", "So <ANSWER>391</ANSWER>"):
        r = await person.post(f"/ui/organize/{eid}/write", data={"text": text})
        assert r.status_code == 202, r.text
    row = await wait_status(gw, eid)
    assert row.status == "completed" and row.answer == "391" and row.config["organizer"] == "human"
    with gw.app.state.gateway.session_factory() as s:
        segments = {seg.agent: seg for seg in repository.episode_segments(s, eid)}
    organizer = segments["organizer"]
    assert organizer.author == "human" and organizer.model_version == "human"
    assert "<JOIN-1>17*20 = 340; 17*3 = 51</JOIN-1>" in organizer.text
    assert "<JOIN-2>worked: Worker. check 391</JOIN-2>" in organizer.text
    assert sum(organizer.completion_mask) > 0 and 0 in organizer.completion_mask  # person's tokens, injected results
    assert segments["1"].endpoint == "python" and segments["2"].endpoint is None and segments["2"].author is None
    stranger = await sign_in(gw, new_key(gw, Scope.HUMAN, name="Other"))
    assert (await stranger.post(f"/ui/organize/{eid}/write", data={"text": "x"})).status_code == 404
    await person.aclose()
    await stranger.aclose()


async def test_a_plan_is_proposed_edited_approved_and_followed(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    import json

    gw = await gateway(make_gateway, tmp_path)
    person = await sign_in(gw, new_key(gw, Scope.HUMAN, name="Planner"))
    r = await person.post("/ui/plan", data={"task": "chat", "prompt": "plan me: 25+50 and 3*25", "capacity": "3"})
    assert r.status_code == 303, r.text
    plan_id = r.headers["location"].rsplit("/", 1)[1]
    page = await person.get(f"/ui/plans/{plan_id}")
    proposed = json.loads(re.search(r'id="proposed">(.*?)</script>', page.text, re.S).group(1))  # type: ignore[union-attr]
    assert [(s["kind"], s["fork_id"], s["query"]) for s in proposed["steps"]] == [
        ("fork", 1, "25+50"), ("fork", 2, "3*25"), ("join", 1, ""), ("join", 2, "")]
    edited = {"steps": [
        {"kind": "fork", "fork_id": 2, "query": "3*25", "endpoint": "python", "budget": None},
        {"kind": "fork", "fork_id": 1, "query": "what is 25+50?", "endpoint": None, "budget": 64},
        {"kind": "join", "fork_id": 2}, {"kind": "join", "fork_id": 1},
    ]}
    diff = (await person.post(f"/ui/plans/{plan_id}/diff", data={"plan": json.dumps(edited)})).text
    assert 'class="d-changed"' in diff and 'class="d-moved"' in diff
    bad = {"steps": [*edited["steps"][:2], {"kind": "fork", "fork_id": 3, "query": "x", "endpoint": None}]}
    assert "capacity 3 allows 2" in (await person.post(f"/ui/plans/{plan_id}/diff", data={"plan": json.dumps(bad)})).text
    r = await person.post(f"/ui/plans/{plan_id}/approve", data={"plan": json.dumps(edited), "worker_budget": "256"})
    assert r.status_code == 303
    eid = r.headers["location"].rsplit("/", 1)[1]
    again = await person.post(f"/ui/plans/{plan_id}/approve", data={"plan": json.dumps(edited)})
    assert again.headers["location"].endswith(eid)  # a second approval starts nothing
    row = await wait_status(gw, eid)
    assert row.status == "completed" and row.config["plan"]["steps"][0]["endpoint"] == "python"
    with gw.app.state.gateway.session_factory() as s:
        segments = {seg.agent: seg for seg in repository.episode_segments(s, eid)}
        [plan_row] = people.plans_of_episode(s, eid)
    assert "Approved plan" in segments["organizer"].prompt and "what is 25+50?" in segments["organizer"].prompt
    assert segments["2"].endpoint == "python" and segments["2"].returned == "3*25 = 75"
    assert segments["1"].query == "what is 25+50?" and segments["1"].generated_tokens <= 64
    assert plan_row.proposed == proposed and plan_row.status == "approved"
    assert Plan.model_validate(plan_row.approved) == Plan.model_validate(edited)
    page = await person.get(f"/ui/episodes/{eid}")
    assert 'id="followed"' in page.text
    await person.aclose()


async def test_the_secret_key_is_required_outside_development(tmp_path: Path) -> None:
    from services.gateway.app import create_app
    from shared.config import InsecureSettings

    production = settings_for(tmp_path, environment="production", auth="keys")
    with pytest.raises(InsecureSettings, match="ASYNCTHINK_SECRET_KEY is required"):
        create_app(production)
    create_app(settings_for(tmp_path, environment="production", auth="keys", human_pages=False))
    create_app(settings_for(tmp_path, environment="production", auth="keys", secret_key="s" * 40))
