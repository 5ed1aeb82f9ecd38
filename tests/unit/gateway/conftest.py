"""Fixtures for the gateway's unit tests: the app in embedded mode over a scripted backend.

The ScriptedBackend replays exact texts (one character per token), so answers, T and η are known in
advance. The database is a SQLite file in the test's temporary directory, migrated by the app's own
lifespan, and the bus is the in-process one, as in the embedded default a user gets.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from services.gateway.app import create_app
from shared.backends.base import ModelBackend
from shared.backends.scripted import ScriptedBackend
from shared.config import Settings

FORK = "<FORK-1>25 50</FORK-1>"
JOIN = "<JOIN-1>"
ANSWER_TEXT = "25+50; 3*25"
ANSWER = f"<ANSWER>{ANSWER_TEXT}</ANSWER>"
ORGANIZER = FORK + JOIN + ANSWER
WORKER = "<RETURN>25+50</RETURN>"
TRACE = "<ANSWER>25+50</ANSWER>"

# Critical path: the worker starts at t_f = len(FORK) and ends L = len(WORKER) tokens later; the join
# at t_j = len(FORK + JOIN) waits for it, then the organizer decodes the answer.
EXPECTED_T = max(len(FORK + JOIN), len(FORK) + len(WORKER)) + len(ANSWER)
EXPECTED_ETA = (len(ORGANIZER) + len(WORKER)) / EXPECTED_T
COUNTDOWN = {"numbers": [3, 7, 25, 50], "target": 75}
FINAL = ("completed", "format_error", "failed")


def script(agent: str, prompt: str) -> str:
    """Organizer: fork, join, answer; worker 1: return; parallel traces: answer at once."""
    if agent == "organizer":
        return ORGANIZER
    if agent.startswith("trace-"):
        return TRACE
    return WORKER


def settings_for(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"database_url": f"sqlite:///{tmp_path / 'gateway.db'}", "bus": "inprocess"}
    values.update(overrides)
    return Settings(**values)


@dataclass
class Gateway:
    app: FastAPI
    client: httpx.AsyncClient

    async def submit(self, **body: Any) -> str:
        data: dict[str, Any] = {"task": "countdown", "payload": COUNTDOWN}
        data.update(body)
        r = await self.client.post("/v1/problems", json=data)
        assert r.status_code == 202, r.text
        return str(r.json()["episode_id"])

    async def wait(self, episode_id: str, timeout_s: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            r = await self.client.get(f"/v1/episodes/{episode_id}")
            assert r.status_code == 200, r.text
            body: dict[str, Any] = r.json()
            if body["status"] in FINAL:
                return body
            assert time.monotonic() < deadline, f"episode {episode_id} still {body['status']}"
            await asyncio.sleep(0.02)


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def make_gateway(tmp_path: Path) -> AsyncIterator[GatewayFactory]:
    """Start gateways (lifespan included) with any backend/bus/settings; all are stopped at teardown."""
    stacks: list[Any] = []

    async def make(
        backend: ModelBackend | None = None, *, settings: Settings | None = None, **kwargs: Any
    ) -> Gateway:
        app = create_app(
            settings or settings_for(tmp_path),
            embedded_backend=backend or ScriptedBackend(script),
            **kwargs,
        )
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")
        stacks.append((lifespan, client))
        return Gateway(app, client)

    yield make
    for lifespan, client in reversed(stacks):
        await client.aclose()
        await lifespan.__aexit__(None, None, None)


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> Gateway:
    return await make_gateway()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


LiveServerFactory = Callable[..., str]


@pytest.fixture
def make_live_server(tmp_path: Path) -> Iterator[LiveServerFactory]:
    """Start real uvicorn servers (embedded mode) over any backend, each in a thread; returns base URLs."""
    running: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(backend: ModelBackend, settings: Settings | None = None) -> str:
        home = tmp_path / f"server-{len(running)}"
        home.mkdir()
        app = create_app(settings or settings_for(home), embedded_backend=backend, bind_host="127.0.0.1")
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
        )
        thread = threading.Thread(target=server.run, name="gateway-uvicorn", daemon=True)
        thread.start()
        running.append((server, thread))
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive(), "uvicorn exited during startup"
            assert time.monotonic() < deadline, "uvicorn did not start in 20 s"
            time.sleep(0.02)
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread in running:
        server.should_exit = True
        thread.join(20)


@pytest.fixture
def live_server(make_live_server: LiveServerFactory) -> str:
    """A real uvicorn server (embedded mode, scripted backend) in a thread; its base URL."""
    return make_live_server(ScriptedBackend(script))


def scripted_backend_factory(settings: Settings) -> ScriptedBackend:
    """For ``ASYNCTHINK_BACKEND_FACTORY``: the backend the app opens itself when none is injected."""
    return ScriptedBackend(script, model_id="scripted-from-factory")
