"""The organizer keeps the submissions it runs (leases) and takes over those of a dead organizer.

Issue 13: the organizer swept for stale entries every half ``claim_idle_ms`` and took its own in-flight
ones too; each sweep counted a delivery, and after ``max_deliveries`` the entry was dead-lettered and
acked while its episode still ran (then lost for good if that organizer died). Now a live organizer
renews its entries, so:

* an episode that runs for many lease periods is never claimed, counted again or dead-lettered;
* a dead organizer's entry is claimed by a live one about one lease after its last renewal;
* an organizer that lost an entry (claimed by another while it stalled) stops that episode;
* a dead-lettered submission ends its episode as ``failed`` instead of leaving it ``running``.

These use the in-process bus and SQLite (the bus conformance suite holds Redis to the same rules;
``tests/integration/services/test_organizer_redis.py`` claims a stopped organizer's entry on Redis);
the distributed kill -9 tests are in ``test_resume.py`` and the fault soak. No test sleeps for a
fixed time: each waits for a condition (the episode running, its renewals, the claim's log line).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from services.organizer.service import OrganizerService
from shared.backends.scripted import ScriptedBackend
from shared.bus.base import dead_letter_stream
from shared.bus.inprocess import InProcessBus
from shared.episode import EpisodeSettings
from shared.messages import ORGANIZER_GROUP, PROBLEMS_STREAM, SubmitProblem
from shared.store import db, repository
from tests.helpers import until
from tests.scenarios.scripts import PAYLOAD

SLOW_ORGANIZER = "Thinking it over slowly, one sum at a time.<ANSWER>1+2+3+4</ANSWER>"  # 68 tokens


class RenewCountingBus(InProcessBus):
    """The in-process bus, counting the renewals that kept an entry (each one a lease period survived)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.renewed: dict[str, int] = {}

    async def renew(self, stream: str, group: str, consumer: str, *ids: str) -> list[str]:
        owned = await super().renew(stream, group, consumer, *ids)
        for entry_id in owned:
            self.renewed[entry_id] = self.renewed.get(entry_id, 0) + 1
        return owned


@dataclass
class Stack:
    bus: RenewCountingBus
    factory: Any
    url: str

    def service(self, name: str, *, tokens_per_s: float = 40.0, claim_idle_ms: int = 300) -> OrganizerService:
        return OrganizerService(
            self.bus,
            self.factory,
            ScriptedBackend({"organizer": SLOW_ORGANIZER}, tokens_per_s=tokens_per_s),
            endpoints={},
            consumer_name=name,
            claim_idle_ms=claim_idle_ms,
            read_block_ms=50,
            shutdown_grace_s=0.5,
        )

    async def submit(self) -> str:
        episode_id = f"lease--{uuid.uuid4().hex[:12]}"
        sub = SubmitProblem(
            episode_id=episode_id, task="countdown", problem_id=episode_id, payload=PAYLOAD,
            settings=EpisodeSettings(mode="sequential"),
        )
        await self.bus.publish(PROBLEMS_STREAM, {"data": sub.model_dump_json()})
        return episode_id

    def status(self, episode_id: str) -> tuple[str | None, str | None]:
        with self.factory() as session:
            ep = repository.get_episode(session, episode_id)
            return (ep.status, ep.error) if ep is not None else (None, None)


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    db.migrate(url)
    engine = db.make_engine(url)
    bus = RenewCountingBus(max_deliveries=2)
    await bus.ensure_group(PROBLEMS_STREAM, ORGANIZER_GROUP)
    yield Stack(bus, db.session_factory(engine), url)
    engine.dispose()


async def test_a_long_episode_is_never_claimed_counted_or_dead_lettered_by_its_own_organizer(stack: Stack) -> None:
    service = stack.service("only", tokens_per_s=40.0, claim_idle_ms=300)  # ~1.7 s: over 5 leases
    stop = asyncio.Event()
    runner = asyncio.create_task(service.run_forever(stop))
    try:
        episode_id = await stack.submit()
        await until(lambda: service.episodes_done == 1 and not service.in_progress, "the episode", timeout_s=15)
    finally:
        stop.set()
        await asyncio.wait_for(runner, 10)
    # the episode outlived its lease several times over: renewed every 75 ms, 8 renewals are 600 ms,
    # two leases of 300 ms (without the renewals it would have been claimed, counted and dead-lettered)
    (renewals,) = stack.bus.renewed.values()
    assert renewals >= 8, renewals
    assert await stack.bus.read(dead_letter_stream(PROBLEMS_STREAM), after="0") == []
    assert stack.bus.pending_count(PROBLEMS_STREAM, ORGANIZER_GROUP) == 0
    assert stack.status(episode_id) == ("completed", None)
    assert service.episodes_done == 1  # run once


async def test_a_dead_organizers_entry_is_claimed_about_one_lease_later(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "services.organizer.service")
    episode_id = await stack.submit()
    (entry,) = await stack.bus.read_group(PROBLEMS_STREAM, ORGANIZER_GROUP, "died", block_ms=0)
    service = stack.service("alive", tokens_per_s=2000.0, claim_idle_ms=300)
    stop = asyncio.Event()
    runner = asyncio.create_task(service.run_forever(stop))
    try:
        await until(lambda: service.episodes_done == 1 and not service.in_progress, "the episode", timeout_s=10)
    finally:
        stop.set()
        await asyncio.wait_for(runner, 10)
    # claimed (not read anew): its second delivery, taken once idle for the lease
    claimed = f"claimed submission {entry.id} of a dead organizer (idle over 300 ms; delivery 2)"
    assert [r.getMessage() for r in caplog.records].count(claimed) == 1
    assert stack.status(episode_id) == ("completed", None)
    assert stack.bus.pending_count(PROBLEMS_STREAM, ORGANIZER_GROUP) == 0


async def test_an_organizer_that_lost_its_lease_stops_the_episode(stack: Stack) -> None:
    service = stack.service("stalls", tokens_per_s=20.0, claim_idle_ms=300)  # ~3.4 s episode
    stop = asyncio.Event()
    runner = asyncio.create_task(service.run_forever(stop))
    try:
        episode_id = await stack.submit()
        await until(lambda: service.in_progress == 1, "the episode to start", timeout_s=5)
        await until(lambda: stack.status(episode_id)[0] == "running", "the episode to be marked running", timeout_s=5)
        # Another organizer takes the entry over (as if this one had stalled past its lease).
        entries = await stack.bus.claim_stale(PROBLEMS_STREAM, ORGANIZER_GROUP, "rescuer", min_idle_ms=0)
        assert len(entries) == 1
        await until(lambda: service.in_progress == 0, "the lost episode to stop", timeout_s=3)
        assert service.episodes_done == 0  # stopped, neither saved nor acked
        assert service.leases_lost == 1
        assert stack.bus.pending_count(PROBLEMS_STREAM, ORGANIZER_GROUP) == 1  # still the rescuer's
    finally:
        stop.set()
        await asyncio.wait_for(runner, 10)


async def test_a_dead_lettered_submission_fails_its_episode(stack: Stack) -> None:
    episode_id = await stack.submit()
    for consumer in ("dies-1", "dies-2"):  # two organizers die running it: max_deliveries (2) reached
        await stack.bus.claim_stale(PROBLEMS_STREAM, ORGANIZER_GROUP, consumer, min_idle_ms=0)
        if consumer == "dies-1":
            await stack.bus.read_group(PROBLEMS_STREAM, ORGANIZER_GROUP, consumer, block_ms=0)
    with stack.factory() as session:  # it had been marked running by one of them
        from shared.tasks import get_task

        task = get_task("countdown")
        repository.create_episode(
            session, episode_id=episode_id, problem=task.problem_from_payload(PAYLOAD, episode_id),
            mode="sequential", capacity=2, model_id="scripted",
        )
        repository.mark_running(session, episode_id=episode_id)
    service = stack.service("alive", claim_idle_ms=300)
    stop = asyncio.Event()
    runner = asyncio.create_task(service.run_forever(stop))
    try:
        await until(lambda: stack.status(episode_id)[0] == "failed", "the episode to fail", timeout_s=5)
    finally:
        stop.set()
        await asyncio.wait_for(runner, 10)
    status, error = stack.status(episode_id)
    assert error is not None and "dead-letter" in error
    assert len(await stack.bus.read(dead_letter_stream(PROBLEMS_STREAM), after="0")) == 1
    assert service.episodes_done == 0
