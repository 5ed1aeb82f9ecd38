"""The organizer's consume loop against a real Redis server (the store is a SQLite file).

* A malformed submission and an invalid one (its task rejects it) are acked: ``XPENDING`` is empty and
  the group has read everything; each leaves its log line, and the stored episode stays ``pending``.
* A finished episode whose submission is delivered again is acked without running again.
* A dead organizer's submission: an organizer that stops (its shutdown grace runs out) without acking
  leaves the entry pending under its name; a second organizer claims it once it has been idle for
  ``claim_idle_ms`` (``XAUTOCLAIM``), runs the episode and acks it.

Redis: ``ASYNCTHINK_SCENARIO_REDIS_URL`` (default ``redis://127.0.0.1:6379/9``); each test deletes the
problems stream and its dead letters there first. Skipped when Redis is unreachable, unless ``CI`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.organizer.service import DEAD_LETTERS, OrganizerService
from shared.backends.scripted import ScriptedBackend
from shared.episode import EpisodeSettings
from shared.messages import ORGANIZER_GROUP, PROBLEMS_STREAM, SubmitProblem
from shared.store import db, repository
from shared.tasks import get_task
from tests.helpers import redis_bus_or_skip, until

pytestmark = pytest.mark.integration

REDIS_URL = os.environ.get("ASYNCTHINK_SCENARIO_REDIS_URL", "redis://127.0.0.1:6379/9")
PAYLOAD = {"numbers": [1, 2, 3, 4], "target": 10, "n_solutions": 2}
ANSWER = "<ANSWER>1+2+3+4; 2*3+4</ANSWER>"
LOG = "services.organizer.service"


@pytest.fixture
async def bus() -> AsyncIterator[Any]:
    import redis.asyncio as aioredis

    b = await redis_bus_or_skip(REDIS_URL)
    b.direct = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)  # for XPENDING and clean-up
    await b.direct.delete(PROBLEMS_STREAM, DEAD_LETTERS)
    await b.ensure_group(PROBLEMS_STREAM, ORGANIZER_GROUP)
    yield b
    await b.direct.delete(PROBLEMS_STREAM, DEAD_LETTERS)
    await b.direct.aclose()
    await b.close()


@pytest.fixture
def factory(tmp_path: Path) -> Any:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    db.migrate(url)
    engine = db.make_engine(url)
    yield db.session_factory(engine)
    engine.dispose()


def submission(**change: Any) -> SubmitProblem:
    sub = SubmitProblem(
        episode_id=f"redis-org20-{uuid.uuid4().hex[:10]}", task="countdown", problem_id="p", payload=PAYLOAD,
        settings=EpisodeSettings(mode="sequential"),
    )  # fmt: skip
    return sub.model_copy(update=change)


def service(bus: Any, factory: Any, backend: Any = None, **kw: Any) -> OrganizerService:
    options: dict[str, Any] = {
        "consumer_name": "o1",
        "read_block_ms": 50,
        "claim_idle_ms": 2000,
        "shutdown_grace_s": 5,
    }
    options.update(kw)
    return OrganizerService(
        bus, factory, backend or ScriptedBackend({"organizer": ANSWER}), endpoints={}, **options
    )


@contextlib.asynccontextmanager
async def running(svc: OrganizerService) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(svc.run_forever(stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def xpending(bus: Any) -> int:
    return int((await bus.direct.xpending(PROBLEMS_STREAM, ORGANIZER_GROUP))["pending"])


async def all_read_and_acked(bus: Any, svc: OrganizerService) -> bool:
    backlog = await bus.backlog(PROBLEMS_STREAM, ORGANIZER_GROUP)
    return backlog.lag == 0 and await xpending(bus) == 0 and svc.in_progress == 0


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOG]


def create(factory: Any, episode_id: str) -> None:
    with factory() as session:
        repository.create_episode(
            session, episode_id=episode_id, problem=get_task("countdown").problem_from_payload(PAYLOAD, "p"),
            mode="sequential", capacity=2, model_id="scripted",
        )  # fmt: skip


async def test_malformed_and_invalid_submissions_are_acked_and_logged(
    bus: Any, factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOG)
    invalid = submission(task="no-such-task")
    bad_payload = submission(payload={"numbers": [1, 2]})
    create(factory, invalid.episode_id)
    create(factory, bad_payload.episode_id)
    svc = service(bus, factory)
    malformed = await bus.publish(PROBLEMS_STREAM, {"data": "{not json"})
    ids = [await bus.publish(PROBLEMS_STREAM, {"data": s.model_dump_json()}) for s in (invalid, bad_payload)]
    async with running(svc):
        await until(lambda: all_read_and_acked(bus, svc), "every submission read and acked")
    assert await xpending(bus) == 0
    lines = messages(caplog)
    assert any(m.startswith(f"dropping malformed submission {malformed}: ") for m in lines), lines
    for entry_id, sub in zip(ids, (invalid, bad_payload), strict=True):
        assert any(
            m.startswith(f"dropping submission {entry_id} of episode {sub.episode_id}: ") for m in lines
        )
        with factory() as session:
            assert repository.get_episode(session, sub.episode_id).status == "pending"
    assert svc.episodes_done == 0


async def test_a_finished_episode_delivered_again_is_acked_and_not_run_again(
    bus: Any, factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOG)
    backend = ScriptedBackend({"organizer": ANSWER})
    svc = service(bus, factory, backend)
    sub = submission()
    async with running(svc):
        await bus.publish(PROBLEMS_STREAM, {"data": sub.model_dump_json()})
        await until(lambda: svc.episodes_done == 1, "the episode")
        await until(lambda: all_read_and_acked(bus, svc), "the first ack")
        await bus.publish(PROBLEMS_STREAM, {"data": sub.model_dump_json()})  # delivered again
        await until(lambda: all_read_and_acked(bus, svc), "the second submission read and acked")
    assert svc.episodes_done == 1 and backend.calls == 1
    skipped = f"episode {sub.episode_id} already finished in the store; skipping the redelivered submission"
    assert messages(caplog).count(skipped) == 1
    with factory() as session:
        assert repository.get_episode(session, sub.episode_id).status == "completed"


async def test_a_dead_organizers_submission_is_claimed_by_a_live_one(
    bus: Any, factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOG)
    sub = submission()
    # the first organizer decodes slowly (31 tokens at 5/s) and stops before the end: no ack
    first = service(bus, factory, ScriptedBackend({"organizer": ANSWER}, tokens_per_s=5.0), consumer_name="first",
                    shutdown_grace_s=0.05)  # fmt: skip
    async with running(first):
        entry_id = await bus.publish(PROBLEMS_STREAM, {"data": sub.model_dump_json()})
        await until(lambda: first.in_progress == 1, "the first organizer to take it")
    assert first.episodes_done == 0
    (pending,) = await bus.direct.xpending_range(PROBLEMS_STREAM, ORGANIZER_GROUP, "-", "+", 10)
    assert (pending["message_id"], pending["consumer"], pending["times_delivered"]) == (entry_id, "first", 1)
    with factory() as session:
        assert repository.get_episode(session, sub.episode_id).status == "running"

    second = service(bus, factory, consumer_name="second", claim_idle_ms=1000)
    async with running(second):
        await until(lambda: all_read_and_acked(bus, second), "the claimed episode to run and be acked")
    assert second.episodes_done == 1
    assert f"claimed submission {entry_id} of a dead organizer (idle over 1000 ms; delivery 2)" in messages(
        caplog
    )
    with factory() as session:
        ep = repository.get_episode(session, sub.episode_id)
        assert (ep.status, ep.answer) == ("completed", "1+2+3+4; 2*3+4")
