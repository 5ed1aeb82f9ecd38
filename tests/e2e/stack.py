"""The distributed stack the browser tests drive: the real gateway (uvicorn, its own thread and event loop)
and an organizer service (another thread), on PostgreSQL and Redis, with a scripted model.

Every Redis stream name carries a prefix unique to the run (:class:`PrefixedBus`), deleted at the end; the
PostgreSQL database is created for the run and dropped after. The organizer serves ``@human`` forks with
the human queue's endpoint (model fallback: the scripted model in process) and the python tool.

The script (:func:`script`) picks its text by the prompt, so one model serves every test: a chat prompt
starting ``human:`` forks its question to a person and joins it; ``plan me`` proposes two forks, or
follows an approved plan in its prompt; ``team:`` forks to the model, the python tool and a
person at once; a worker returns a line naming what it was asked.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn

from services.gateway.app import create_app
from services.human.endpoint import human_endpoints
from services.human.planner import LocalModelWorker
from services.organizer.service import OrganizerService
from services.workers.tools import local_endpoints
from shared.backends.scripted import ScriptedBackend
from shared.bus.redis_streams import RedisStreamsBus
from shared.config import Settings
from shared.store import make_engine, migrate, repository, session_factory
from tests.integration.gateway.test_gateway_distributed import PrefixedBus

ADMIN_KEY = "e2e-admin-key-not-a-secret-0123456789abcdef"
SECRET_KEY = "e2e-session-secret-not-a-secret-0123456789"
PLAN_PROPOSAL = "<FORK-1>25+50</FORK-1><FORK-2>3*25</FORK-2><JOIN-1><JOIN-2><ANSWER>25+50; 3*25</ANSWER>"
TEAM = (
    "The numbers are 3 7 25 50 and the target 75. Split it: "
    "<FORK-1>Find two expressions over 3 7 25 50 that make 75</FORK-1>"
    "<FORK-2@python>25+50; 3*25; 7*(25-3)-50-29</FORK-2>"
    "<FORK-3@human>Which of these would a teacher accept as distinct: 25+50, 50+25, 3*25?</FORK-3>"
    "While they work: 25+50 = 75 and 3*25 = 75 are candidates.<JOIN-2><JOIN-1><JOIN-3>"
    "<ANSWER>25+50; 3*25</ANSWER>"
)


def _follow_plan(prompt: str) -> str:
    out = []
    for line in prompt.split("Approved plan", 1)[1].splitlines():
        fork = re.match(r"- fork (\d+) → (\S+): (.*?)( \(budget \d+\))?$", line)
        join = re.match(r"- join (\d+)$", line)
        if fork:
            i, ep, q = fork.groups()[:3]
            out.append(f"<FORK-{i}{'' if ep == 'model' else '@' + ep}>{q}</FORK-{i}>")
        elif join:
            out.append(f"<JOIN-{join.group(1)}>")
    return "Following the approved plan. " + "".join(out) + "<ANSWER>as planned</ANSWER>"


def script(agent: str, prompt: str) -> str:
    if agent == "organizer":
        if "Approved plan" in prompt:
            return _follow_plan(prompt)
        if "plan me" in prompt:
            return PLAN_PROPOSAL
        if "team:" in prompt:
            return TEAM
        question = re.search(r"human: (.*)", prompt)
        asked = question.group(1).strip() if question else "Is this right?"
        return f"I will ask a person. <FORK-1@human>{asked}</FORK-1>Meanwhile I check it myself: it looks right.<JOIN-1>So.<ANSWER>checked</ANSWER>"
    asked = prompt.strip().splitlines()
    return "<RETURN>the model says: " + " / ".join(line.strip() for line in asked[-3:])[:160] + "</RETURN>"


@dataclass
class Stack:
    url: str
    settings: Settings
    postgres_url: str
    sessions: Any

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)

    def key(self, name: str, *scopes: str, pools: list[str] | None = None) -> str:
        with self.sessions() as s:
            _, key = repository.create_api_key(s, name=name, scopes=list(scopes) or ["human"], pools=pools)
        return key

    def submit(self, prompt: str, **settings: Any) -> str:
        body = {"task": "chat", "payload": {"prompt": prompt}, "stream_text": True, **settings}
        with self.api() as api:
            r = api.post("/v1/problems", json=body)
        assert r.status_code == 202, r.text
        return str(r.json()["episode_id"])

    def episode(self, episode_id: str, *, final: bool = True, timeout_s: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            with self.sessions() as s:
                row = repository.get_episode(s, episode_id)
            if row is not None and (not final or row.status in ("completed", "format_error", "failed")):
                return row
            assert time.monotonic() < deadline, f"episode {episode_id} is {row.status if row else 'missing'}"
            time.sleep(0.1)

    def segments(self, episode_id: str) -> dict[str, Any]:
        with self.sessions() as s:
            return {seg.agent: seg for seg in repository.episode_segments(s, episode_id)}

    def audit(self, episode_id: str) -> list[tuple[str, str | None]]:
        from shared.store import people

        with self.sessions() as s:
            return [(a.action, a.actor_name) for a in people.audit(s, episode_id=episode_id)]


class _Thread:
    """An event loop in a thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout_s: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def start_stack(postgres_url: str, redis_url: str, port: int, **overrides: Any) -> tuple[Stack, Any]:
    """Start the gateway and an organizer; returns the stack and a function that stops both."""
    migrate(postgres_url)
    prefix = f"asyncthink-e2e:{uuid.uuid4().hex[:10]}:"
    values: dict[str, Any] = {
        "database_url": postgres_url, "bus": "redis", "redis_url": redis_url, "auth": "keys", "admin_key": ADMIN_KEY,
        "secret_key": SECRET_KEY, "human_lease_s": 3, "human_undo_s": 1.5, "human_poll_s": 0.1, "auth_cache_s": 0,
    }
    values.update(overrides)
    settings = Settings(**values)
    engine = make_engine(postgres_url)
    sessions = session_factory(engine)

    organizer_loop = _Thread("e2e-organizer")
    stop = asyncio.Event()

    async def organizer() -> None:
        bus = PrefixedBus(RedisStreamsBus(redis_url), prefix)
        backend = ScriptedBackend(script)
        endpoints = dict(local_endpoints()) | human_endpoints(sessions, bus, settings, model=LocalModelWorker(backend))
        service = OrganizerService(bus, sessions, backend, endpoints=endpoints, consumer_name="e2e", read_block_ms=200,
                                   shutdown_grace_s=2.0)
        try:
            await service.run_forever(stop)
        finally:
            await bus.inner.delete_prefix(prefix)
            await bus.inner.close()

    organizer_task = asyncio.run_coroutine_threadsafe(organizer(), organizer_loop.loop)

    gateway_bus = PrefixedBus(RedisStreamsBus(redis_url), prefix)
    app = create_app(settings, bus=gateway_bus, embedded_backend=ScriptedBackend(script), bind_host="127.0.0.1")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                                         timeout_graceful_shutdown=2))
    gateway_thread = threading.Thread(target=server.run, name="e2e-gateway", daemon=True)
    gateway_thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert gateway_thread.is_alive() and time.monotonic() < deadline, "the gateway did not start"
        time.sleep(0.05)

    def shutdown() -> None:
        server.should_exit = True
        gateway_thread.join(15)
        organizer_loop.loop.call_soon_threadsafe(stop.set)
        try:
            organizer_task.result(20)
        finally:
            organizer_loop.stop()
            engine.dispose()

    return Stack(f"http://127.0.0.1:{port}", settings, postgres_url, sessions), shutdown
