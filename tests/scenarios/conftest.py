"""The two setups the one scenario suite runs against.

* ``embedded``: :class:`InProcessBus`, workers in process (the engine's ``ModelWorker`` and the local
  python tool), a migrated SQLite file.
* ``distributed`` (marked ``integration``): :class:`RedisStreamsBus`, a real Celery worker process
  (``celery -A services.workers.app worker -Q model,tool --pool=threads -c 4``, started here with the
  scenario scripts injected through ``ASYNCTHINK_BACKEND_FACTORY``), :class:`CeleryWorkerEndpoint`, and a
  fresh PostgreSQL database (created, migrated, dropped).

Both run the real :class:`OrganizerService`: a test publishes a :class:`SubmitProblem` to the problems
stream and reads the episode's events and stored trace back.

The distributed setup owns one Redis database (``ASYNCTHINK_SCENARIO_REDIS_URL``, default
``redis://127.0.0.1:6379/9``; flushed at start, because its Celery queues and problems stream must not
hold leftovers of an aborted run) and creates its own PostgreSQL database on
``ASYNCTHINK_SCENARIO_PG_URL`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``, used only to
create and drop it). When Redis or PostgreSQL cannot be reached the setup is skipped, unless ``CI`` is
set, where that is a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from services.organizer.service import OrganizerService
from services.runtime import events_until_finished
from shared.bus.base import Bus
from shared.messages import PROBLEMS_STREAM, EpisodeEvent, SubmitProblem
from tests.missing import missing
from tests.scenarios.scripts import WORKER_TIMEOUT_S, ScenarioBackend

REPO = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("ASYNCTHINK_SCENARIO_REDIS_URL", "redis://127.0.0.1:6379/9")
PG_URL = os.environ.get("ASYNCTHINK_SCENARIO_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
BACKEND_FACTORY = "tests.scenarios.scripts:backend_factory"


def _unreachable(what: str, exc: BaseException) -> None:
    missing(f"{what} is unreachable: {exc}", "start it (see tests/scenarios/conftest.py for the URLs it reads)")


# ----------------------------------------------------------------------------- servers (session scope)
@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    from shared.store import db

    url = f"sqlite:///{tmp_path_factory.mktemp('store') / 'scenarios.db'}"
    db.migrate(url)
    return url


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    import psycopg
    from sqlalchemy.engine import make_url

    from shared.store import db

    admin = make_url(PG_URL)
    conninfo = f"host={admin.host} port={admin.port or 5432} user={admin.username} dbname={admin.database}"
    if admin.password:
        conninfo += f" password={admin.password}"
    name = f"asyncthink_scenarios_{uuid.uuid4().hex[:8]}"
    try:
        with psycopg.connect(conninfo, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        _unreachable(f"PostgreSQL at {admin.host}:{admin.port}", exc)
    url = admin.set(database=name).render_as_string(hide_password=False)
    db.migrate(url)
    yield url
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=3) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_ready() -> str:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        _unreachable(f"Redis at {REDIS_URL}", exc)
    client.flushdb()
    client.close()
    return REDIS_URL


@pytest.fixture(scope="session")
def celery_worker(redis_ready: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real Celery worker process on the model and tool queues, serving the scenario scripts."""
    from services.workers.app import make_app

    env = dict(
        os.environ,
        ASYNCTHINK_REDIS_URL=redis_ready,
        ASYNCTHINK_BACKEND_FACTORY=BACKEND_FACTORY,
        PYTHONPATH=str(REPO),
    )
    log = tmp_path_factory.mktemp("celery") / "worker.log"
    celery = str(Path(sys.executable).with_name("celery"))
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [celery, "-A", "services.workers.app", "worker", "-Q", "model,tool", "--pool=threads",
             "-c", "4", "--loglevel=INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    app = make_app(redis_ready)
    try:
        deadline = time.monotonic() + 30
        while True:  # ready when it answers an echo task
            if proc.poll() is not None:
                pytest.fail(f"celery worker exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                app.send_task("asyncthink.echo", args=["ping"], queue="model").get(timeout=2)
                break
            except Exception:
                if time.monotonic() > deadline:
                    pytest.fail(f"celery worker did not answer in 30 s:\n{log.read_text()[-3000:]}")
        yield app
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ----------------------------------------------------------------------------- one setup (per test)
@dataclass
class Setup:
    name: str
    bus: Bus
    session_factory: Callable[[], Any]
    service: OrganizerService

    async def submit(self, submission: SubmitProblem) -> None:
        await self.bus.publish(PROBLEMS_STREAM, {"data": submission.model_dump_json()})

    async def events_until_finished(self, episode_id: str, timeout_s: float = 30.0) -> list[EpisodeEvent]:
        return await events_until_finished(self.bus, episode_id, timeout_s=timeout_s)


@contextlib.asynccontextmanager
async def _running(setup: Setup) -> AsyncIterator[Setup]:
    stop = asyncio.Event()
    task = asyncio.create_task(setup.service.run_forever(stop))
    try:
        yield setup
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


@pytest.fixture(params=["embedded", pytest.param("distributed", marks=pytest.mark.integration)])
async def setup(request: pytest.FixtureRequest) -> AsyncIterator[Setup]:
    from shared.store import db

    if request.param == "embedded":
        from shared.bus.inprocess import InProcessBus

        url = request.getfixturevalue("sqlite_url")
        from services.workers.tools import local_endpoints

        bus: Bus = InProcessBus()
        endpoints: dict[str | None, Any] = dict(local_endpoints())
        close: Callable[[], Any] | None = None
    else:
        from services.workers.endpoint import CeleryWorkerEndpoint
        from shared.bus.redis_streams import RedisStreamsBus

        url = request.getfixturevalue("postgres_url")
        app = request.getfixturevalue("celery_worker")
        bus = RedisStreamsBus(REDIS_URL)
        celery_endpoint = CeleryWorkerEndpoint(bus, app)
        endpoints = dict(celery_endpoint.endpoints())
        close = celery_endpoint.close
    engine = db.make_engine(url)
    factory = db.session_factory(engine)
    service = OrganizerService(
        bus,
        factory,
        ScenarioBackend(),
        endpoints=endpoints,
        consumer_name=f"scenarios-{uuid.uuid4().hex[:6]}",
        worker_timeout_cap_s=WORKER_TIMEOUT_S,
        read_block_ms=200,
        shutdown_grace_s=5.0,
    )
    try:
        async with _running(Setup(request.param, bus, factory, service)) as s:
            yield s
    finally:
        if close is not None:
            await close()
        await bus.close()
        engine.dispose()
