"""The gateway in the distributed setup: real Redis Streams bus, real PostgreSQL, no organizer inside.

An :class:`OrganizerService` runs as a task of the test (over a scripted backend, so answers are exact)
and consumes what the gateway publishes on Redis; traces land in a fresh PostgreSQL database. The
official ``openai`` client talks to the app through the ASGI transport of httpx2 (what openai 3 uses).

Every stream name is prefixed per test (:class:`PrefixedBus`), so parallel runs and other suites on the
same Redis never share the problems stream or its consumer group. Skipped when Redis or PostgreSQL is
unreachable, unless ``CI`` is set (then it fails).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import httpx2
import openai
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select

from services.gateway.app import create_app
from services.organizer.service import OrganizerService
from services.workers.tools import local_endpoints
from shared.backends.scripted import ScriptedBackend
from shared.bus.base import Entry
from shared.bus.redis_streams import RedisStreamsBus
from shared.config import Settings
from shared.store import Episode, make_engine, migrate, session_factory
from tests.helpers import redis_bus_or_skip

pytestmark = pytest.mark.integration

REDIS_URL = (
    os.environ.get("ASYNCTHINK_REDIS_URL") or os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
)

FORK, JOIN, ANSWER_TEXT = "<FORK-1>25 50</FORK-1>", "<JOIN-1>", "25+50; 3*25"
ORGANIZER = f"{FORK}{JOIN}<ANSWER>{ANSWER_TEXT}</ANSWER>"
WORKER = "<RETURN>25+50</RETURN>"
EXPECTED_T = max(len(FORK + JOIN), len(FORK) + len(WORKER)) + len(f"<ANSWER>{ANSWER_TEXT}</ANSWER>")
COUNTDOWN = {"numbers": [3, 7, 25, 50], "target": 75}


def script(agent: str, prompt: str) -> str:
    return ORGANIZER if agent == "organizer" else WORKER


class PrefixedBus:
    """A :class:`Bus` whose stream names all start with ``prefix`` (test isolation on a shared Redis)."""

    def __init__(self, bus: RedisStreamsBus, prefix: str) -> None:
        self.inner = bus
        self.prefix = prefix
        self.max_deliveries = bus.max_deliveries

    async def ping(self) -> None:
        await self.inner.ping()

    async def publish(self, stream: str, fields: dict[str, str], *, maxlen: int | None = None) -> str:
        return await self.inner.publish(self.prefix + stream, fields, maxlen=maxlen)

    async def ensure_group(self, stream: str, group: str, *, start: str = "0") -> None:
        await self.inner.ensure_group(self.prefix + stream, group, start=start)

    async def read_group(
        self, stream: str, group: str, consumer: str, *, count: int = 10, block_ms: int = 1000
    ) -> list[Entry]:
        return await self.inner.read_group(
            self.prefix + stream, group, consumer, count=count, block_ms=block_ms
        )

    async def ack(self, stream: str, group: str, *ids: str) -> int:
        return await self.inner.ack(self.prefix + stream, group, *ids)

    async def claim_stale(
        self, stream: str, group: str, consumer: str, *, min_idle_ms: int, count: int = 10
    ) -> list[Entry]:
        return await self.inner.claim_stale(
            self.prefix + stream, group, consumer, min_idle_ms=min_idle_ms, count=count
        )

    async def read(
        self, stream: str, *, after: str = "0", count: int = 100, block_ms: int = 0
    ) -> list[Entry]:
        return await self.inner.read(self.prefix + stream, after=after, count=count, block_ms=block_ms)

    async def close(self) -> None:
        return None


async def _redis_or_skip(url: str = REDIS_URL) -> RedisStreamsBus:
    bus: RedisStreamsBus = await redis_bus_or_skip(url)
    return bus


@dataclass
class Distributed:
    app: FastAPI
    client: httpx.AsyncClient
    settings: Settings
    postgres_url: str

    async def wait(self, episode_id: str, timeout_s: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            body: dict[str, Any] = (await self.client.get(f"/v1/episodes/{episode_id}")).json()
            if body["status"] in ("completed", "format_error", "failed"):
                return body
            assert time.monotonic() < deadline, f"episode {episode_id} still {body['status']}"
            await asyncio.sleep(0.05)


@pytest.fixture
async def distributed(postgres_url: str) -> AsyncIterator[Distributed]:
    redis_bus = await _redis_or_skip()
    prefix = f"asyncthink-test:{uuid.uuid4().hex[:12]}:"
    bus = PrefixedBus(redis_bus, prefix)
    await asyncio.to_thread(migrate, postgres_url)
    settings = Settings(database_url=postgres_url, bus="redis", redis_url=REDIS_URL)
    app = create_app(settings, bus=bus)  # the app builds its own PostgreSQL session factory
    engine = make_engine(postgres_url)
    organizer = OrganizerService(
        bus,
        session_factory(engine),
        ScriptedBackend(script),
        endpoints=local_endpoints(),
        consumer_name=f"test-{prefix}",
        read_block_ms=200,
    )
    stop = asyncio.Event()
    organizer_task = asyncio.create_task(organizer.run_forever(stop))
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://gateway", timeout=30
            ) as client:
                yield Distributed(app, client, settings, postgres_url)
    finally:
        stop.set()
        await asyncio.wait_for(organizer_task, 30)
        engine.dispose()
        await redis_bus.delete_prefix(prefix)
        await redis_bus.close()


async def test_no_organizer_inside_and_ready(distributed: Distributed) -> None:
    state = distributed.app.state.gateway
    assert not state.embedded and state.organizer_task is None
    r = await distributed.client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["checks"] == {"database": "ok", "redis": "ok"}


async def test_submit_poll_and_read_the_trace_from_postgres(distributed: Distributed) -> None:
    r = await distributed.client.post("/v1/problems", json={"task": "countdown", "payload": COUNTDOWN})
    assert r.status_code == 202, r.text
    eid = r.json()["episode_id"]
    episode = await distributed.wait(eid)
    assert episode["status"] == "completed" and episode["answer"] == ANSWER_TEXT
    assert episode["latency"] == EXPECTED_T and episode["forks"] == 1
    detail = (await distributed.client.get(f"/v1/episodes/{eid}", params={"include_tokens": True})).json()
    organizer = next(s for s in detail["segments"] if s["agent"] == "organizer")
    assert sum(organizer["completion_mask"]) == len(ORGANIZER)
    listing = (
        await distributed.client.get("/v1/episodes", params={"status": "completed", "limit": 200})
    ).json()
    assert eid in {i["id"] for i in listing["items"]}


async def test_sse_over_redis(distributed: Distributed) -> None:
    r = await distributed.client.post("/v1/problems", json={"task": "countdown", "payload": COUNTDOWN})
    eid = r.json()["episode_id"]
    stream = await distributed.client.get(f"/v1/episodes/{eid}/events")
    events = [
        (block.split("event: ")[1].split("\n")[0], json.loads(block.split("data: ", 1)[1]))
        for block in stream.text.split("\n\n")
        if "event: " in block
    ]
    kinds = [k for k, _ in events]
    for earlier, later in (("fork", "join"), ("join", "worker_result"), ("worker_result", "answer")):
        assert kinds.index(earlier) < kinds.index(later)
    assert kinds[-1] == "finished" and events[-1][1]["data"]["answer"] == ANSWER_TEXT


async def test_official_openai_client(distributed: Distributed) -> None:
    # openai >= 3 is built on httpx2, so its custom client must be an httpx2 one.
    http = httpx2.AsyncClient(
        transport=httpx2.ASGITransport(app=distributed.app), base_url="http://gateway/v1"
    )
    client = openai.AsyncOpenAI(
        base_url="http://gateway/v1", api_key="unused", http_client=http, max_retries=0
    )
    resp = await client.chat.completions.create(
        model="asyncthink-countdown", messages=[{"role": "user", "content": "numbers: 3 7 25 50 target: 75"}]
    )
    assert resp.choices[0].message.content == ANSWER_TEXT
    assert resp.id == f"chatcmpl-{(resp.model_extra or {})['episode_id']}"
    assert resp.usage is not None and resp.usage.completion_tokens == len(ORGANIZER) + len(WORKER)

    stream = await client.chat.completions.create(
        model="asyncthink-countdown",
        messages=[{"role": "user", "content": "numbers: 3 7 25 50 target: 75"}],
        stream=True,
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER_TEXT
    assert chunks[-1].choices[0].finish_reason == "stop"
    await client.close()


async def test_invalid_input_writes_nothing_to_postgres(distributed: Distributed) -> None:
    engine = make_engine(distributed.postgres_url)
    count = select(func.count()).select_from(Episode)
    try:
        with engine.connect() as conn:
            before = conn.execute(count).scalar_one()
        for body in (
            {"task": "countdown", "payload": {"numbers": [3]}},
            {"task": "countdown", "payload": COUNTDOWN, "capacity": 0},
            {"task": "nope", "payload": {}},
        ):
            assert (await distributed.client.post("/v1/problems", json=body)).status_code == 422
        with engine.connect() as conn:
            assert conn.execute(count).scalar_one() == before
    finally:
        engine.dispose()


async def test_app_builds_its_redis_bus_and_readyz_names_redis_when_down(postgres_url: str) -> None:
    await (await _redis_or_skip()).close()  # skip early when Redis is down
    for url, expect in ((REDIS_URL, 200), ("redis://127.0.0.1:1/0", 503)):
        app = create_app(Settings(database_url=postgres_url, bus="redis", redis_url=url))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
                r = await client.get("/readyz")
        assert r.status_code == expect, r.text
        if expect == 503:
            assert r.json()["failed"] == ["redis"] and r.json()["checks"]["database"] == "ok"


async def test_unstorable_strings_are_422_without_url_or_sql(distributed: Distributed) -> None:
    """PostgreSQL cannot store NUL, and nothing encodes a lone surrogate: these used to be 503s whose body
    held the database URL, the SQL and its parameters."""
    engine = make_engine(distributed.postgres_url)
    count = select(func.count()).select_from(Episode)
    headers = {"content-type": "application/json"}
    try:
        with engine.connect() as conn:
            before = conn.execute(count).scalar_one()
        for body in (
            '{"task": "countdown", "payload": {"numbers": [3, 7, 25, 50], "target": 75}, "problem_id": "a\\u0000"}',
            '{"task": "countdown", "payload": {"numbers": [3, 7, 25, 50], "target": 75}, "problem_id": "\\ud800"}',
            '{"task": "math", "payload": {"problem": "1+1=\\u0000?"}}',
            '{"task": "math", "payload": {"problem": "1+1=\\udfff?"}}',
        ):
            r = await distributed.client.post("/v1/problems", content=body.encode(), headers=headers)
            assert r.status_code == 422, r.text
            for leak in ("postgresql", "INSERT", "SELECT", "Traceback", "[SQL"):
                assert leak not in r.text, r.text
        r = await distributed.client.get("/v1/episodes", params={"model_version": "v\x00"})
        assert r.status_code == 422, r.text
        with engine.connect() as conn:
            assert conn.execute(count).scalar_one() == before
    finally:
        engine.dispose()


async def test_out_of_range_last_event_id_is_422_on_redis(distributed: Distributed) -> None:
    r = await distributed.client.post("/v1/problems", json={"task": "countdown", "payload": COUNTDOWN})
    eid = r.json()["episode_id"]
    await distributed.wait(eid)
    for entry in ("99999999999999999999999-0", "1-18446744073709551616"):
        r = await distributed.client.get(f"/v1/episodes/{eid}/events", headers={"Last-Event-ID": entry})
        assert r.status_code == 422, r.text
        r = await distributed.client.get(f"/v1/episodes/{eid}/events", params={"after": entry})
        assert r.status_code == 422, r.text
    r = await distributed.client.get(f"/v1/episodes/{eid}/events", params={"after": f"{2**64 - 1}-0"})
    assert r.status_code == 204, r.text


async def test_keys_and_rate_limits_shared_by_two_gateways(postgres_url: str) -> None:
    """Keys live in PostgreSQL, token buckets in Redis: two gateway replicas share one limit per key."""
    from services.gateway.ratelimit import RedisRateLimiter
    from shared.auth import Scope
    from shared.store import repository

    redis_bus = await _redis_or_skip()
    prefix = f"asyncthink-test:{uuid.uuid4().hex[:12]}:"
    bus = PrefixedBus(redis_bus, prefix)
    await asyncio.to_thread(migrate, postgres_url)
    admin = "k" * 40
    settings = Settings(database_url=postgres_url, bus="redis", redis_url=REDIS_URL, auth="keys", admin_key=admin)
    engine = make_engine(postgres_url)
    with session_factory(engine)() as s:
        _, limited = repository.create_api_key(s, name="limited", scopes=[Scope.READ], rate_limit_per_minute=3)
        _, alice = repository.create_api_key(s, name="alice", scopes=[Scope.SUBMIT, Scope.READ])
    apps = [create_app(settings, bus=bus), create_app(settings, bus=bus)]
    try:
        async with apps[0].router.lifespan_context(apps[0]), apps[1].router.lifespan_context(apps[1]):
            assert isinstance(apps[0].state.gateway.rate_limiter, RedisRateLimiter)
            clients = [
                httpx.AsyncClient(transport=httpx.ASGITransport(app=a), base_url="http://gateway") for a in apps
            ]
            codes = []
            for i in range(4):
                r = await clients[i % 2].get("/v1/episodes", headers={"Authorization": f"Bearer {limited}"})
                codes.append(r.status_code)
            assert codes == [200, 200, 200, 429]
            assert int(r.headers["retry-after"]) >= 1
            assert (await clients[0].get("/v1/episodes", headers={"Authorization": "Bearer garbage"})).status_code == 401
            r = await clients[1].post(
                "/v1/problems",
                json={"task": "countdown", "payload": COUNTDOWN},
                headers={"X-API-Key": alice},
            )
            assert r.status_code == 202, r.text
            eid = r.json()["episode_id"]
            mine = await clients[0].get(f"/v1/episodes/{eid}", headers={"X-API-Key": alice})
            assert mine.status_code == 200
            other = await clients[0].get(f"/v1/episodes/{eid}", headers={"Authorization": f"Bearer {admin}"})
            assert other.status_code == 200
            for c in clients:
                await c.aclose()
    finally:
        engine.dispose()
        await redis_bus.delete_prefix(prefix)
        await redis_bus.close()


async def test_redis_token_bucket() -> None:
    from services.gateway.ratelimit import RedisRateLimiter

    await (await _redis_or_skip()).close()
    limiter = RedisRateLimiter(REDIS_URL)
    key = f"test-{uuid.uuid4().hex}"
    try:
        assert [await limiter.acquire(key, per_minute=2) for _ in range(2)] == [0.0, 0.0]
        wait = await limiter.acquire(key, per_minute=2)
        assert 0 < wait <= 30
        assert await limiter.acquire(key, per_minute=0) == 0.0
    finally:
        await limiter.close()
    down = RedisRateLimiter("redis://127.0.0.1:1/0", timeout_s=0.5)
    assert await down.acquire(key, per_minute=1) == 0.0  # fails open (logged), never a 500
    await down.close()
