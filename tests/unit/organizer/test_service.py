"""The organizer service through its consume loop: :meth:`OrganizerService.run_forever` reads every
submission from the in-process bus and stores into a migrated SQLite file, with the scripted backend.

What each submission must come to, read back from the bus (pending entries, streams), the store and the
log: a malformed or invalid submission is acked and logged (its stored episode stays ``pending``); a
finished episode delivered again is acked without running again; a worker that raises is recorded in
the stored trace; an interrupted episode resumes from its checkpoint or runs again; leases, dead
letters, bus failures, backpressure, the concurrency limit and shutdown behave as the module says.
Nothing here needs a server; the same wiring against Redis is in ``tests/integration``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.organizer.service import (
    DEAD_LETTERS,
    InvalidSubmission,
    OrganizerService,
    default_consumer_name,
)
from shared.backends.scripted import ScriptedBackend
from shared.bus.base import Entry
from shared.bus.inprocess import InProcessBus
from shared.bus.redis_streams import BusConnectionError
from shared.episode import EpisodeSettings
from shared.messages import (
    ORGANIZER_GROUP,
    PROBLEMS_STREAM,
    EpisodeEvent,
    SegmentRecord,
    SubmitProblem,
    WorkerOutcome,
    WorkerTask,
    events_stream,
    results_stream,
)
from shared.store import db, repository
from shared.tasks import get_task
from tests.helpers import WAIT_S, until

PAYLOAD = {"numbers": [1, 2, 3, 4], "target": 10, "n_solutions": 2}
ANSWER = "<ANSWER>1+2+3+4; 2*3+4</ANSWER>"  # 31 tokens, both solutions correct
LOG = "services.organizer.service"


# ----------------------------------------------------------------------------- the parts
class Store:
    def __init__(self, url: str) -> None:
        self.engine = db.make_engine(url)
        self.factory = db.session_factory(self.engine)

    def episode(self, episode_id: str) -> Any:
        with self.factory() as session:
            return repository.get_episode(session, episode_id)

    def segments(self, episode_id: str) -> dict[str, Any]:
        with self.factory() as session:
            return {s.agent: s for s in repository.episode_segments(session, episode_id)}

    def create(self, episode_id: str, *, running: bool = False, mode: str = "sequential") -> None:
        problem = get_task("countdown").problem_from_payload(PAYLOAD, "p")
        with self.factory() as session:
            repository.create_episode(
                session, episode_id=episode_id, problem=problem, mode=mode, capacity=2, model_id="scripted"
            )
            if running:
                repository.mark_running(session, episode_id=episode_id)


@pytest.fixture(scope="module")
def migrated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file, made once: each test copies it (migrating costs more than most tests)."""
    path = tmp_path_factory.mktemp("organizer") / "migrated.db"
    db.migrate(f"sqlite:///{path}")
    return path


@pytest.fixture
def store(tmp_path: Path, migrated: Path) -> Any:
    shutil.copyfile(migrated, tmp_path / "store.db")
    s = Store(f"sqlite:///{tmp_path / 'store.db'}")
    yield s
    s.engine.dispose()


def submission(episode_id: str | None = None, **settings: Any) -> SubmitProblem:
    return SubmitProblem(
        episode_id=episode_id or f"ep-{uuid.uuid4().hex[:10]}", task="countdown", problem_id="p",
        payload=PAYLOAD, settings=EpisodeSettings(**({"mode": "sequential"} | settings)),
    )  # fmt: skip


async def publish(bus: InProcessBus, sub: SubmitProblem | dict[str, str]) -> str:
    fields = {"data": sub.model_dump_json()} if isinstance(sub, SubmitProblem) else sub
    return await bus.publish(PROBLEMS_STREAM, fields)


def make_service(bus: InProcessBus, store: Store, backend: Any = None, **kw: Any) -> OrganizerService:
    options: dict[str, Any] = {
        "consumer_name": "o1",
        "read_block_ms": 20,
        "claim_idle_ms": 400,
        "shutdown_grace_s": 5,
    }
    options.update(kw)
    return OrganizerService(
        bus,
        store.factory,
        backend or ScriptedBackend({"organizer": ANSWER}),
        endpoints=options.pop("endpoints", {}),
        **options,
    )


@contextlib.asynccontextmanager
async def running(service: OrganizerService) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(service.run_forever(stop))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


# How long a test waits for a condition before failing: generous by default; mutation runs lower it
# (a mutant that breaks the wiring then fails sooner, not later).


async def settled(bus: InProcessBus, service: OrganizerService) -> bool:
    """Every submission read (no lag), none pending and nothing running (and the group exists: the
    service made it)."""
    stream = bus._streams.get(PROBLEMS_STREAM)
    if stream is None or ORGANIZER_GROUP not in stream.groups:
        return False
    backlog = await bus.backlog(PROBLEMS_STREAM, ORGANIZER_GROUP)
    return backlog.lag == 0 and backlog.pending == 0 and service.in_progress == 0


async def events(bus: InProcessBus, episode_id: str) -> list[EpisodeEvent]:
    return [
        EpisodeEvent.model_validate_json(e.fields["data"]) for e in await bus.read(events_stream(episode_id))
    ]


def messages(caplog: pytest.LogCaptureFixture, level: int | None = None) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOG and (level is None or r.levelno == level)]


# ----------------------------------------------------------------------------- submissions that cannot run
@pytest.mark.parametrize("fields", [{"data": "{not json"}, {"data": '{"episode_id": "e"}'}, {"other": "x"}])
async def test_a_malformed_submission_is_acked_and_logged(
    store: Store, fields: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOG)
    bus = InProcessBus()
    service = make_service(bus, store)
    async with running(service):
        entry_id = await publish(bus, fields)
        await until(lambda: settled(bus, service), "the malformed submission to be acked")
    assert bus.pending_count(PROBLEMS_STREAM, ORGANIZER_GROUP) == 0
    (line,) = [m for m in messages(caplog, logging.ERROR) if "malformed" in m]
    assert line.startswith(f"dropping malformed submission {entry_id}: ")
    assert re.search(r"\d+ validation errors? for SubmitProblem", line)  # the parser's own reason
    assert service.episodes_done == 0


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"task": "no-such-task"}, "no-such-task"),  # get_task: KeyError
        ({"payload": {"numbers": [1, 2], "n_solutions": 2}}, "target"),  # the task rejects the payload
        ({"settings": EpisodeSettings(mode="sequential", capacity=1, worker_timeout_s=5)}, None),  # valid
    ],
)
async def test_an_invalid_submission_is_acked_logged_and_its_episode_stays_pending(
    store: Store, change: dict[str, Any], why: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOG)
    bus = InProcessBus()
    sub = submission().model_copy(update=change)
    store.create(sub.episode_id)  # the gateway stored it before submitting
    service = make_service(bus, store)
    async with running(service):
        entry_id = await publish(bus, sub)
        await until(lambda: settled(bus, service), "the submission to be acked")
    assert bus.pending_count(PROBLEMS_STREAM, ORGANIZER_GROUP) == 0
    dropped = [m for m in messages(caplog, logging.ERROR) if m.startswith("dropping submission")]
    if why is None:  # the control: a valid submission runs
        assert dropped == [] and store.episode(sub.episode_id).status == "completed"
        return
    (line,) = dropped
    assert line.startswith(f"dropping submission {entry_id} of episode {sub.episode_id}: ") and why in line
    assert store.episode(sub.episode_id).status == "pending"
    assert service.episodes_done == 0


def test_problem_of_an_invalid_submission_raises_invalid_submission() -> None:
    with pytest.raises(InvalidSubmission, match="no-such-task"):
        OrganizerService._problem(submission().model_copy(update={"task": "no-such-task"}))
    with pytest.raises(InvalidSubmission):
        OrganizerService._problem(submission().model_copy(update={"payload": {"target": 3}}))


# ----------------------------------------------------------------------------- one episode, end to end
async def test_an_episode_is_run_stored_published_and_acked(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOG)
    bus = InProcessBus()
    backend = ScriptedBackend({"organizer": ANSWER})
    service = make_service(bus, store, backend, stream_ttl_s=0)
    sub = submission(capacity=1)
    async with running(service):
        await publish(bus, sub)  # not stored before: written straight to the stream
        await until(lambda: service.episodes_done == 1, "the episode")
        await until(lambda: settled(bus, service), "the ack")
    ep = store.episode(sub.episode_id)
    # sequential, c = 1: T = 31, η = 1, R_A = 1, R_η = min(1/1, 0.75)/0.75 = 1, R = 1 + 0.2 = 1.2
    assert (ep.status, ep.answer, ep.latency, ep.capacity) == ("completed", "1+2+3+4; 2*3+4", 31, 1)
    assert (ep.accuracy, ep.reward_concurrency, ep.reward_total) == (1.0, 1.0, pytest.approx(1.2))
    assert store.segments(sub.episode_id)["organizer"].text == ANSWER
    kinds = [event.kind for event in await events(bus, sub.episode_id)]
    assert kinds[0] == "started" and kinds[-1] == "finished" and kinds.count("finished") == 1
    assert (await events(bus, sub.episode_id))[0].data["problem_id"] == "p"  # the submission's problem id
    assert backend.calls == 1
    lines = messages(caplog, logging.INFO)
    assert f"episode {sub.episode_id} started: task countdown, mode sequential, capacity 1" in lines
    done = f"episode {sub.episode_id} completed: answer='1+2+3+4; 2*3+4' T=31 eta=1.000 forks=0 wall="
    (line,) = [m for m in lines if m.startswith(done)]
    assert re.fullmatch(r"\d+\.\d{3}s", line[len(done) :]), line  # no error part
    assert service.episodes_resumed == service.episodes_rerun == 0
    assert lines[0] == (
        "organizer o1 consuming asyncthink:problems (group organizers, up to 64 episodes at once, "
        "lease 400 ms renewed every 100 ms)"
    )


async def test_a_finished_episode_delivered_again_is_acked_and_not_run_again(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOG)
    bus = InProcessBus()
    backend = ScriptedBackend({"organizer": ANSWER})
    service = make_service(bus, store, backend)
    sub = submission()
    async with running(service):
        await publish(bus, sub)
        await until(lambda: service.episodes_done == 1, "the episode")
        await until(lambda: settled(bus, service), "the first ack")
        stored = store.episode(sub.episode_id)
        await publish(bus, sub)  # at-least-once: the same submission again
        await until(lambda: settled(bus, service), "the redelivered submission to be acked")
    assert service.episodes_done == 1 and backend.calls == 1  # not run again
    again = store.episode(sub.episode_id)
    assert (again.status, again.finished_at, again.answer) == ("completed", stored.finished_at, stored.answer)
    skipped = f"episode {sub.episode_id} already finished in the store; skipping the redelivered submission"
    assert messages(caplog, logging.INFO).count(skipped) == 1


async def test_a_second_submission_of_a_running_episode_waits_for_it_then_is_acked(store: Store) -> None:
    bus = InProcessBus()
    backend = ScriptedBackend({"organizer": ANSWER}, tokens_per_s=100.0)  # 0.3 s
    service = make_service(bus, store, backend)
    sub = submission()
    async with running(service):
        await publish(bus, sub)
        await publish(bus, sub)
        await until(lambda: service.in_progress == 2, "both submissions to be taken")
        await until(lambda: service.episodes_done == 1, "the episode")
        await until(lambda: settled(bus, service), "both acks")
    assert service.episodes_done == 1 and backend.calls == 1


class Exploding:
    """A worker endpoint that raises (a broken tool, not a timeout)."""

    def __init__(self) -> None:
        self.tasks: list[WorkerTask] = []

    async def run(self, task: WorkerTask) -> WorkerOutcome:
        self.tasks.append(task)
        raise RuntimeError("worker exploded")


async def test_a_worker_that_raises_is_recorded_and_the_episode_goes_on(store: Store) -> None:
    bus = InProcessBus()
    org = "<FORK-1>q</FORK-1><JOIN-1>" + ANSWER
    exploding = Exploding()
    service = make_service(bus, store, ScriptedBackend({"organizer": org}), endpoints={None: exploding})
    sub = submission(mode="asyncthink", capacity=2)
    async with running(service):
        await publish(bus, sub)
        await until(lambda: service.episodes_done == 1, "the episode")
        await until(lambda: settled(bus, service), "the ack")
    assert [t.query for t in exploding.tasks] == ["q"]
    ep = store.episode(sub.episode_id)
    assert (ep.status, ep.answer, ep.error) == ("completed", "1+2+3+4; 2*3+4", None)
    segs = store.segments(sub.episode_id)
    assert segs["1"].error == "failed: worker exploded"
    # the organizer is handed the failure as the join's result
    assert "<JOIN-1>[worker 1 failed: worker exploded]</JOIN-1>" in segs["organizer"].text
    # the failed worker decoded nothing: T = the organizer's 18 + 8 + 31 = 57 tokens, η = 1
    assert (ep.latency, ep.eta) == (57, 1.0)


async def test_a_backend_that_fails_ends_the_episode_failed_and_acked(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOG)
    bus = InProcessBus()
    service = make_service(bus, store, ScriptedBackend({"someone": "x"}))  # no script for the organizer
    sub = submission()
    async with running(service):
        await publish(bus, sub)
        await until(lambda: service.episodes_done == 1, "the episode")
        await until(lambda: settled(bus, service), "the ack")
    ep = store.episode(sub.episode_id)
    assert ep.status == "failed" and "no script for agent 'organizer'" in ep.error
    (line,) = [m for m in messages(caplog, logging.INFO) if m.startswith(f"episode {sub.episode_id} failed:")]
    assert re.fullmatch(
        r".* answer=None T=0 eta=0\.000 forks=0 wall=\d+\.\d{3}s error=.*no script for agent.*", line
    )


class FailingStore:
    """A session factory whose sessions cannot be opened (the database is down)."""

    def __call__(self) -> Any:
        raise ConnectionError("database down (test)")


async def test_an_episode_whose_processing_raises_stays_pending_for_redelivery(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOG)
    bus = InProcessBus()
    service = OrganizerService(bus, FailingStore(), ScriptedBackend({"organizer": ANSWER}), endpoints={},
                               consumer_name="o1", read_block_ms=20, claim_idle_ms=60_000)  # fmt: skip
    sub = submission()
    async with running(service):
        entry_id = await publish(bus, sub)
        await until(lambda: any("left pending" in m for m in messages(caplog)), "the failure")
        await until(lambda: service.in_progress == 0, "the task to end")
    assert bus.pending_count(PROBLEMS_STREAM, ORGANIZER_GROUP) == 1
    assert f"episode {sub.episode_id} (entry {entry_id}) failed; left pending for redelivery" in messages(
        caplog
    )


# ----------------------------------------------------------------------------- interrupted episodes
PREFIX = "<ANSWER>1+2+3"  # what an organizer that died had decoded (13 tokens)


def save_checkpoint(store: Store, episode_id: str, text: str = PREFIX) -> None:
    ids = [ord(c) for c in text]
    seg = SegmentRecord(agent="organizer", role="organizer", text=text, completion_ids=ids,
                        completion_mask=[1] * len(ids), generated_tokens=len(ids))  # fmt: skip
    with store.factory() as session:
        repository.save_segment(session, episode_id=episode_id, segment=seg)


@pytest.mark.parametrize("resume", [True, False])
async def test_an_interrupted_episode_resumes_from_its_checkpoint_or_runs_again(
    store: Store, resume: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOG)
    bus = InProcessBus()
    backend = ScriptedBackend({"organizer": ANSWER}, resumable=True)
    service = make_service(bus, store, backend, resume=resume)
    sub = submission()
    store.create(sub.episode_id, running=True)
    save_checkpoint(store, sub.episode_id)
    async with running(service):
        await publish(bus, sub)
        await until(lambda: service.episodes_done == 1, "the episode")
        await until(lambda: settled(bus, service), "the ack")
    ep = store.episode(sub.episode_id)
    assert (ep.status, ep.answer) == ("completed", "1+2+3+4; 2*3+4")
    (started,) = [e for e in await events(bus, sub.episode_id) if e.kind == "started"]
    warnings = messages(caplog, logging.WARNING)
    if resume:
        assert (service.episodes_resumed, service.episodes_rerun) == (1, 0)
        assert started.data["resumed_tokens"] == 13
        assert (f"episode {sub.episode_id} resumed: the organizer continues from 13 tokens it had decoded "
                "(0 joined results in its prefix) instead of from its prompt") in warnings  # fmt: skip
    else:
        assert (service.episodes_resumed, service.episodes_rerun) == (0, 1)
        assert "resumed_tokens" not in started.data
        assert (f"episode {sub.episode_id} was left running by an organizer that stopped; running it again "
                "from the start") in warnings  # fmt: skip


async def test_a_running_episode_without_checkpoint_runs_again(store: Store) -> None:
    bus = InProcessBus()
    service = make_service(bus, store)
    sub = submission()
    store.create(sub.episode_id, running=True)
    save_checkpoint(store, sub.episode_id, "")  # an organizer row with no ids is no checkpoint
    async with running(service):
        await publish(bus, sub)
        await until(lambda: service.episodes_done == 1, "the episode")
    assert (service.episodes_resumed, service.episodes_rerun) == (0, 1)
    assert store.episode(sub.episode_id).status == "completed"


# ----------------------------------------------------------------------------- leases and dead organizers
async def test_a_dead_organizers_submission_is_claimed_and_run(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOG)
    bus = InProcessBus()
    await bus.ensure_group(PROBLEMS_STREAM, ORGANIZER_GROUP)
    sub = submission()
    entry_id = await publish(bus, sub)
    (entry,) = await bus.read_group(PROBLEMS_STREAM, ORGANIZER_GROUP, "dead", block_ms=0)  # never acked
    # reads block for at most a renewal period (50 ms), not read_block_ms, so the sweep comes in time
    service = make_service(bus, store, claim_idle_ms=200, read_block_ms=60_000)
    async with running(service):
        await until(lambda: service.episodes_done == 1, "the claimed episode")
        await until(lambda: settled(bus, service), "the ack")
    assert store.episode(sub.episode_id).status == "completed"
    assert f"claimed submission {entry_id} of a dead organizer (idle over 200 ms; delivery 2)" in messages(
        caplog, logging.WARNING
    )


async def test_an_organizer_that_lost_its_lease_stops_and_leaves_the_entry(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOG)
    bus = InProcessBus()
    service = make_service(bus, store, ScriptedBackend({"organizer": ANSWER * 20}, tokens_per_s=100.0),
                           claim_idle_ms=200)  # fmt: skip
    sub = submission()
    async with running(service):
        entry_id = await publish(bus, sub)
        await until(lambda: service.in_progress == 1, "the episode to start")
        # another organizer takes the entry over, as if this one had stalled past its lease
        (taken,) = await bus.claim_stale(PROBLEMS_STREAM, ORGANIZER_GROUP, "rescuer", min_idle_ms=0)
        assert taken.id == entry_id
        await until(lambda: service.in_progress == 0, "the lost episode to stop")
        assert service.leases_lost == 1 and service.episodes_done == 0
        assert bus.pending_count(PROBLEMS_STREAM, ORGANIZER_GROUP) == 1  # the rescuer's, not acked
    ep = store.episode(sub.episode_id)  # left to the new owner, as this organizer started it
    assert (ep.status, ep.capacity, ep.mode, ep.model_id, ep.model_version) == (
        "running",
        2,
        "sequential",
        "scripted",
        "scripted",
    )
    assert ep.config == sub.stored_config()
    assert any(
        m
        == f"organizer o1 lost the lease of submission {entry_id} (another organizer claimed it after this one "
        "stalled past 200 ms); stopping its episode here"
        for m in messages(caplog)
    )


async def test_a_run_that_ends_after_its_lease_was_lost_is_not_stored(store: Store) -> None:
    bus = InProcessBus()
    await bus.ensure_group(PROBLEMS_STREAM, ORGANIZER_GROUP)
    service = make_service(bus, store)
    sub = submission()
    await publish(bus, sub)
    (entry,) = await bus.read_group(PROBLEMS_STREAM, ORGANIZER_GROUP, "o1", block_ms=0)
    await bus.claim_stale(PROBLEMS_STREAM, ORGANIZER_GROUP, "other", min_idle_ms=0)
    from services.organizer.service import LeaseLost

    with pytest.raises(LeaseLost, match=f"another organizer claimed its submission {entry.id}"):
        await service.handle(sub, entry_id=entry.id)
    assert store.episode(sub.episode_id).status == "running" and service.episodes_done == 0


async def test_a_long_episode_keeps_its_lease(store: Store) -> None:
    bus = InProcessBus(max_deliveries=1)
    # 31 tokens at 40/s: about 0.8 s, four lease periods of 200 ms; a lost lease would stop it
    service = make_service(
        bus, store, ScriptedBackend({"organizer": ANSWER}, tokens_per_s=40.0), claim_idle_ms=200
    )
    sub = submission()
    async with running(service):
        await publish(bus, sub)
        await until(lambda: service.episodes_done == 1, "the episode")
        await until(lambda: settled(bus, service), "the ack")
    assert service.leases_lost == 0
    assert await bus.read(DEAD_LETTERS, after="0") == []


async def test_a_dead_lettered_submission_fails_its_episode(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOG)
    bus = InProcessBus(max_deliveries=1)
    await bus.ensure_group(PROBLEMS_STREAM, ORGANIZER_GROUP)
    sub, unknown = submission(), submission()  # stored running / never stored
    broken = submission().model_copy(update={"task": "no-such-task"})  # stored running, cannot run
    never_stored = submission().model_copy(update={"task": "no-such-task"})  # nothing to fail
    store.create(sub.episode_id, running=True)
    store.create(broken.episode_id, running=True)
    first = await publish(bus, sub)
    for s in (unknown, broken, never_stored):
        await publish(bus, s)
    garbage = [await publish(bus, {"data": "garbage"}), await publish(bus, {"other": "x"})]
    await bus.read_group(PROBLEMS_STREAM, ORGANIZER_GROUP, "died", count=10, block_ms=0)  # delivered once
    service = make_service(bus, store, claim_idle_ms=200)
    async with running(service):
        await until(lambda: service.dead_letters_failed == 3, "the dead letters")
        await until(
            lambda: sum("holds no valid submission" in m for m in messages(caplog)) == 2, "the garbage"
        )
        await until(
            lambda: bus.pending_count(DEAD_LETTERS, ORGANIZER_GROUP) == 0, "the dead letters to be acked"
        )
    error = "dead-lettered after 1 deliveries: organizers died 1 times while running this episode"
    for s in (sub, unknown, broken):
        ep = store.episode(s.episode_id)
        assert (ep.status, ep.error) == ("failed", error), s.episode_id
    assert store.episode(never_stored.episode_id) is None
    assert service.episodes_done == 0
    dead = {e.fields["dead_id"]: e.id for e in await bus.read(DEAD_LETTERS, after="0")}
    for entry_id in garbage:
        assert f"dead letter {dead[entry_id]} holds no valid submission; dropped" in messages(
            caplog, logging.ERROR
        )
    assert f"episode {sub.episode_id} failed: its submission {first} was {error}" in messages(
        caplog, logging.ERROR
    )
    assert not any("handling dead letter" in m for m in messages(caplog))


# ----------------------------------------------------------------------------- a bus that fails
class FlakyBus(InProcessBus):
    """The in-process bus with calls that fail a given number of times, as the Redis bus fails when
    Redis goes away (:class:`BusConnectionError`)."""

    def __init__(self, **fails: int) -> None:
        super().__init__()
        self.fails = fails
        self.calls: dict[str, int] = {}

    def _maybe_fail(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.fails.get(name, 0) > 0:
            self.fails[name] -= 1
            raise BusConnectionError(f"{name}: Redis down (test)")

    async def read_group(self, *args: Any, **kw: Any) -> list[Entry]:
        if args[0] == PROBLEMS_STREAM:
            self._maybe_fail("read_group")
        return await super().read_group(*args, **kw)

    async def ack(self, *args: Any) -> int:
        self._maybe_fail("ack")
        return await super().ack(*args)

    async def renew(self, *args: Any) -> list[str]:
        self._maybe_fail("renew")
        return await super().renew(*args)

    async def claim_stale(self, *args: Any, **kw: Any) -> list[Entry]:
        self._maybe_fail("claim_stale")
        return await super().claim_stale(*args, **kw)


async def test_a_failed_read_is_retried(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOG)
    bus = FlakyBus(read_group=1)
    service = make_service(bus, store)
    sub = submission()
    async with running(service):
        await publish(bus, sub)
        await until(lambda: service.episodes_done == 1, "the episode after the failed read")
        await until(lambda: settled(bus, service), "the ack")
    assert f"reading {PROBLEMS_STREAM} failed: read_group: Redis down (test); retrying in 1 s" in messages(
        caplog
    )


async def test_an_ack_is_retried_through_a_short_outage(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOG)
    bus = FlakyBus(ack=2)
    service = make_service(bus, store)
    async with running(service):
        entry_id = await publish(bus, submission())
        await until(lambda: service.episodes_done == 1, "the episode")
        await until(lambda: settled(bus, service), "the ack after two failures")
    assert bus.calls["ack"] == 3
    lines = messages(caplog)  # the retries are logged by the organizer's logger, naming the entry
    assert sum(m.startswith(f"acking submission {entry_id} failed (") for m in lines) == 2
    assert f"acking submission {entry_id} succeeded after 2 retries" in lines


async def test_a_failed_renewal_keeps_the_episode_and_claims_wait(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOG)
    bus = FlakyBus(renew=2)
    await bus.ensure_group(PROBLEMS_STREAM, ORGANIZER_GROUP)
    service = make_service(
        bus, store, ScriptedBackend({"organizer": ANSWER}, tokens_per_s=100.0), claim_idle_ms=200
    )
    await publish(bus, submission())
    (entry,) = await bus.read_group(PROBLEMS_STREAM, ORGANIZER_GROUP, "o1", block_ms=0)
    service._start(entry)
    assert await service.renew_leases() is False  # Redis could not be asked
    assert await service._may_claim() is False  # its own renewal fails: no sweep
    assert await service._may_claim() is False  # renewed, but no sweep right after a failure ...
    await until(service._may_claim, "claims to resume")  # ... until Redis answered for half a lease
    assert "organizer o1: renewing 1 leases failed: renew: Redis down (test)" in messages(
        caplog, logging.WARNING
    )
    assert await service.renew_leases() is True
    await until(lambda: service.in_progress == 0, "the episode")
    assert service.episodes_done == 1 and service.leases_lost == 0
    assert await service.renew_leases() is True  # nothing to renew


async def test_a_failed_lease_check_before_storing_stores_anyway(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOG)
    bus = FlakyBus(renew=1)
    service = make_service(bus, store)
    assert await service._still_owner("1-0") is True
    assert messages(caplog, logging.WARNING) == [
        "checking the lease of 1-0 failed (renew: Redis down (test)); storing the episode anyway"
    ]


async def test_a_failed_dead_letter_read_is_logged(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOG)
    bus = FlakyBus(claim_stale=1)
    await bus.ensure_group(DEAD_LETTERS, ORGANIZER_GROUP)
    service = make_service(bus, store)
    await service._reap_dead_letters()
    assert f"reading {DEAD_LETTERS} failed: claim_stale: Redis down (test)" in messages(
        caplog, logging.WARNING
    )
    assert await service._may_claim() is False  # a failed dead-letter read counts as a bus failure


# ----------------------------------------------------------------------------- limits
async def test_at_most_max_concurrent_episodes_run_at_once(store: Store) -> None:
    bus = InProcessBus()
    service = make_service(bus, store, ScriptedBackend({"organizer": ANSWER}, tokens_per_s=100.0),
                           max_concurrent_episodes=1)  # fmt: skip
    first, second = submission(), submission()
    async with running(service):
        await publish(bus, first)
        await publish(bus, second)
        await until(lambda: service.in_progress == 1, "the first episode")
        assert (await bus.backlog(PROBLEMS_STREAM, ORGANIZER_GROUP)).lag == 1  # the second waits unread
        await until(lambda: service.episodes_done == 2, "both episodes")
    assert store.episode(second.episode_id).status == "completed"


async def test_no_submission_is_taken_while_writes_lag(store: Store) -> None:
    bus = InProcessBus()
    service = make_service(bus, store, max_write_backlog=-1)  # a backlog of 0 already counts as lagging
    async with running(service):
        await publish(bus, submission())
        await until(lambda: service.backpressure_waits >= 3, "three postponed reads")
        assert (await bus.backlog(PROBLEMS_STREAM, ORGANIZER_GROUP)).lag == 1
    assert service.episodes_done == 0


async def test_shutdown_cancels_episodes_past_the_grace_and_leaves_them_pending(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOG)
    bus = InProcessBus()
    service = make_service(
        bus, store, ScriptedBackend({"organizer": ANSWER}, tokens_per_s=5.0), shutdown_grace_s=0.1
    )
    async with running(service):
        await publish(bus, submission())
        await until(lambda: service.in_progress == 1, "the episode to start")
    assert service.in_progress == 0 and service.episodes_done == 0
    assert bus.pending_count(PROBLEMS_STREAM, ORGANIZER_GROUP) == 1
    assert "organizer o1: 1 episodes cancelled at shutdown, left for redelivery" in messages(
        caplog, logging.WARNING
    )
    assert "organizer o1 stopping: waiting up to 0s for 1 episodes" in messages(caplog, logging.INFO)


async def test_shutdown_lets_a_running_episode_finish_within_the_grace(store: Store) -> None:
    bus = InProcessBus()
    service = make_service(
        bus, store, ScriptedBackend({"organizer": ANSWER}, tokens_per_s=100.0), shutdown_grace_s=10
    )
    async with running(service):
        await publish(bus, submission())
        await until(lambda: service.in_progress == 1, "the episode to start")
    assert service.episodes_done == 1
    assert bus.pending_count(PROBLEMS_STREAM, ORGANIZER_GROUP) == 0


async def test_streams_expire_after_the_ttl(store: Store) -> None:
    bus = InProcessBus()
    service = make_service(bus, store, stream_ttl_s=0.05)
    sub = submission()
    await bus.publish(results_stream(sub.episode_id), {"agent": "1", "started": "1"})  # as a worker does
    async with running(service):
        await publish(bus, sub)
        await until(lambda: service.episodes_done == 1, "the episode")
        await until(lambda: events_stream(sub.episode_id) not in bus._streams, "the events stream to expire")
        await until(
            lambda: results_stream(sub.episode_id) not in bus._streams, "the results stream to expire"
        )


async def test_streams_stay_without_a_ttl(store: Store) -> None:
    bus = InProcessBus()
    service = make_service(bus, store, stream_ttl_s=0)
    sub = submission()
    async with running(service):
        await publish(bus, sub)
        await until(lambda: service.episodes_done == 1, "the episode")
        await asyncio.sleep(0)
    assert events_stream(sub.episode_id) in bus._streams


# ----------------------------------------------------------------------------- settings
def test_settings_are_validated_with_the_fix_named(store: Store) -> None:
    bus = InProcessBus()
    with pytest.raises(ValueError, match="max_concurrent_episodes must be >= 1, got 0"):
        make_service(bus, store, max_concurrent_episodes=0)
    with pytest.raises(
        ValueError,
        match=r"renew_every_ms \(300\) must be at most half of claim_idle_ms \(400\): a live organizer must renew "
        "its leases well before they run out",
    ):
        make_service(bus, store, claim_idle_ms=400, renew_every_ms=300)
    with pytest.raises(ValueError, match="renew_every_ms"):
        make_service(bus, store, claim_idle_ms=400, renew_every_ms=0)
    assert (
        make_service(bus, store, claim_idle_ms=400, renew_every_ms=200).renew_every_ms == 200
    )  # exactly half
    assert make_service(bus, store, claim_idle_ms=3).renew_every_ms == 1  # a quarter, never 0


def test_defaults() -> None:
    service = OrganizerService(InProcessBus(), FailingStore(), ScriptedBackend({}), endpoints={})
    assert service.consumer_name == default_consumer_name()
    assert default_consumer_name().startswith("organizer-")
    assert (service.max_concurrent_episodes, service.claim_idle_ms, service.renew_every_ms) == (
        64,
        10_000,
        2500,
    )
    assert (service.read_block_ms, service.shutdown_grace_s, service.resume) == (1000, 30.0, True)
    assert (service.backpressure_waits, service.leases_lost, service.dead_letters_failed) == (0, 0, 0)
    assert (service.episodes_resumed, service.episodes_rerun) == (0, 0)
    renew = OrganizerService(
        InProcessBus(), FailingStore(), ScriptedBackend({}), endpoints={}, claim_idle_ms=10
    )
    assert renew.renew_every_ms == 2 and isinstance(renew.renew_every_ms, int)  # 10 // 4
    assert (service.stream_ttl_s, service.max_write_backlog, service.worker_timeout_cap_s) == (
        3600.0,
        5000,
        None,
    )
    assert (service.in_progress, service.write_backlog, service.episodes_done) == (0, 0, 0)


def test_a_dead_letter_without_its_delivery_count_still_fails_its_episode(store: Store) -> None:
    service = make_service(InProcessBus(), store)
    sub = submission()
    service._fail_dead_letter(Entry("5-0", {"data": sub.model_dump_json()}, 1))  # not stored before: created
    ep = store.episode(sub.episode_id)
    error = "dead-lettered after ? deliveries: organizers died ? times while running this episode"
    assert (ep.status, ep.error) == ("failed", error)
    assert (ep.capacity, ep.mode, ep.model_id, ep.task) == (2, "sequential", "scripted", "countdown")
    assert service.dead_letters_failed == 1
    service._fail_dead_letter(Entry("6-0", {"data": sub.model_dump_json()}, 1))  # already failed: unchanged
    assert service.dead_letters_failed == 1


# ----------------------------------------------------------------------------- Redis's command batcher
class RecordingBatcher:
    """Stands in for the Redis bus's command batcher: records every command, answers each at once."""

    def __init__(self) -> None:
        self.commands: list[tuple[tuple[Any, ...], bool]] = []
        self.backlog = 0

    async def call(self, *args: Any, urgent: bool = True) -> asyncio.Future[Any]:
        return self.fire(*args, urgent=urgent)

    def fire(self, *args: Any, urgent: bool = True) -> asyncio.Future[Any]:
        self.commands.append((args, urgent))
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(1)
        return fut

    def flush(self) -> None:
        return None


class BatchingBus(InProcessBus):
    """The in-process bus with a command batcher, as the Redis bus has."""

    def __init__(self) -> None:
        super().__init__()
        self.recorder = RecordingBatcher()

    def batcher(self) -> RecordingBatcher:
        return self.recorder


@pytest.mark.parametrize(("ttl_s", "ttl"), [(90.4, "90"), (0.3, "1")])  # rounded, at least 1 s
async def test_with_a_batcher_events_and_expiries_go_through_it(store: Store, ttl_s: float, ttl: str) -> None:
    from shared.messages import done_key

    bus = BatchingBus()
    org = "<FORK-1>q</FORK-1><JOIN-1>" + ANSWER
    backend = ScriptedBackend({"organizer": org, "1": "<RETURN>7</RETURN>"})
    service = make_service(bus, store, backend, stream_ttl_s=ttl_s)
    sub = submission(mode="asyncthink")
    async with running(service):
        await publish(bus, sub)
        await until(lambda: service.episodes_done == 1, "the episode")
        await until(lambda: settled(bus, service), "the ack")
    eid = sub.episode_id
    commands = bus.recorder.commands
    expiries = [(args[1:], urgent) for args, urgent in commands if args[0] == "EXPIRE"]
    assert expiries == [
        ((events_stream(eid), ttl), False),
        ((results_stream(eid), ttl), False),
        ((done_key(eid, "1"), ttl), False),  # the worker's done-marker
    ]
    kinds = [json_kind(args) for args, _ in commands if args[0] == "XADD"]
    assert kinds[0] == "started" and kinds[-1] == "finished"
    assert events_stream(eid) not in bus._streams  # nothing went around the batcher


def json_kind(args: tuple[Any, ...]) -> str:
    return str(EpisodeEvent.model_validate_json(args[-1]).kind)


async def test_a_batcher_backlog_counts_as_lagging_writes(store: Store) -> None:
    bus = BatchingBus()
    bus.recorder.backlog = 6
    service = make_service(bus, store, max_write_backlog=5)
    assert service.write_backlog == 6
    async with running(service):
        await publish(bus, submission())
        await until(lambda: service.backpressure_waits >= 2, "postponed reads")
        assert service.episodes_done == 0
        bus.recorder.backlog = 5  # at the limit: reads again
        await until(lambda: service.episodes_done == 1, "the episode")


async def test_the_stored_episode_keeps_the_submissions_settings(store: Store) -> None:
    bus = InProcessBus(max_deliveries=1)
    service = make_service(bus, store)
    ran, dead = submission(worker_budget=77), submission(worker_budget=78)
    async with running(service):
        await publish(bus, ran)
        await until(lambda: service.episodes_done == 1, "the episode")
    service._fail_dead_letter(Entry("7-0", {"data": dead.model_dump_json(), "dead_deliveries": "5"}, 1))
    assert store.episode(ran.episode_id).config == ran.stored_config()
    assert store.episode(ran.episode_id).config["worker_budget"] == 77
    assert store.episode(dead.episode_id).config == dead.stored_config()
    assert store.episode(dead.episode_id).error.startswith("dead-lettered after 5 deliveries")


async def test_finished_is_published_only_once_the_episode_is_stored(store: Store) -> None:
    bus = InProcessBus()
    service = make_service(bus, store)
    sub = submission()
    seen: list[tuple[str, str | None]] = []

    async def watch() -> None:  # a client: on each event, what the store says
        after = "0"
        while not seen or seen[-1][0] != "finished":
            for entry in await bus.read(events_stream(sub.episode_id), after=after, block_ms=1000):
                after = entry.id
                kind = str(EpisodeEvent.model_validate_json(entry.fields["data"]).kind)
                ep = store.episode(sub.episode_id)
                seen.append((kind, ep.status if ep is not None else None))

    watcher = asyncio.create_task(watch())
    async with running(service):
        await publish(bus, sub)
        await asyncio.wait_for(watcher, WAIT_S)
    assert seen[0][0] == "started"
    assert seen[-1] == ("finished", "completed")
    assert [k for k, _ in seen].count("finished") == 1


def test_only_a_partial_organizer_segment_is_a_checkpoint(store: Store) -> None:
    from services.organizer.service import _checkpoint_of

    eid = "ep-checkpoints"
    store.create(eid, running=True)
    ids = [ord(c) for c in PREFIX]

    def save(**kw: Any) -> None:
        seg = SegmentRecord(text=PREFIX, completion_ids=ids, completion_mask=[1] * len(ids), **kw)
        with store.factory() as session:
            repository.save_segment(session, episode_id=eid, segment=seg)

    def rows() -> list[Any]:
        with store.factory() as session:
            return list(repository.episode_segments(session, eid))

    save(agent="1", role="worker", fork_id=1, parent="organizer")  # a worker's ids: not the organizer's
    assert _checkpoint_of(rows()) is None
    save(agent="organizer", role="organizer", wall_end=5.0)  # finished (wall_end set): not partial
    assert _checkpoint_of(rows()) is None
    save(agent="organizer", role="organizer")
    checkpoint = _checkpoint_of(rows())
    assert checkpoint is not None and checkpoint.completion_ids == ids and checkpoint.agent == "organizer"


async def test_a_pending_episode_runs_from_the_start_even_with_an_organizer_row(store: Store) -> None:
    # only an episode left running by an organizer that stopped resumes; a pending one was never started
    bus = InProcessBus()
    service = make_service(bus, store, ScriptedBackend({"organizer": ANSWER}, resumable=True))
    sub = submission()
    store.create(sub.episode_id)  # pending
    save_checkpoint(store, sub.episode_id)
    async with running(service):
        await publish(bus, sub)
        await until(lambda: service.episodes_done == 1, "the episode")
    assert (service.episodes_resumed, service.episodes_rerun) == (0, 0)
    (started,) = [e for e in await events(bus, sub.episode_id) if e.kind == "started"]
    assert "resumed_tokens" not in started.data


# ----------------------------------------------------------------------------- more dead letters, live segments
class AckRecordingBus(InProcessBus):
    """The in-process bus, keeping every ack: ``(stream, group, ids)``."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.acks: list[tuple[str, str, tuple[str, ...]]] = []

    async def ack(self, stream: str, group: str, *ids: str) -> int:
        self.acks.append((stream, group, ids))
        return await super().ack(stream, group, *ids)


async def dead_letter(bus: InProcessBus, sub: SubmitProblem) -> str:
    """Publish ``sub`` and deliver it ``max_deliveries`` times to consumers that die, so the next sweep
    dead-letters it; returns its entry id."""
    entry_id = await publish(bus, sub)
    await bus.read_group(PROBLEMS_STREAM, ORGANIZER_GROUP, "d0", count=100, block_ms=0)
    for n in range(1, bus.max_deliveries):
        await bus.claim_stale(PROBLEMS_STREAM, ORGANIZER_GROUP, f"d{n}", min_idle_ms=0, count=100)
    return entry_id


async def test_dead_letters_a_dead_organizer_was_handling_are_claimed_failed_and_acked(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOG)
    bus = AckRecordingBus(max_deliveries=2)
    await bus.ensure_group(PROBLEMS_STREAM, ORGANIZER_GROUP)
    await bus.ensure_group(DEAD_LETTERS, ORGANIZER_GROUP)
    taken, fresh = submission(), submission()
    await dead_letter(bus, taken)
    await bus.claim_stale(PROBLEMS_STREAM, ORGANIZER_GROUP, "sweeper", min_idle_ms=0)  # dead-lettered
    # an organizer reads that dead letter and dies before handling it: pending under its name
    (held,) = await bus.read_group(DEAD_LETTERS, ORGANIZER_GROUP, "died-reaping", block_ms=0)
    await dead_letter(bus, fresh)  # dead-lettered by the service's own first sweep
    service = make_service(bus, store, claim_idle_ms=100)
    async with running(service):
        await until(lambda: service.dead_letters_failed == 2, "both dead letters")
        await until(lambda: bus.pending_count(DEAD_LETTERS, ORGANIZER_GROUP) == 0, "their acks")
    assert store.episode(taken.episode_id).status == store.episode(fresh.episode_id).status == "failed"
    dead_acks = [
        ids for stream, group, ids in bus.acks if stream == DEAD_LETTERS and group == ORGANIZER_GROUP
    ]
    assert held.id in {i for ids in dead_acks for i in ids} and len(dead_acks) == 2
    assert await bus.read(f"{DEAD_LETTERS}:dead", after="0") == []  # none dead-lettered a second time


async def test_a_dead_letter_whose_handling_fails_stays_pending(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOG)
    bus = InProcessBus(max_deliveries=1)
    await bus.ensure_group(PROBLEMS_STREAM, ORGANIZER_GROUP)
    await bus.ensure_group(DEAD_LETTERS, ORGANIZER_GROUP)
    await dead_letter(bus, submission())
    await bus.claim_stale(PROBLEMS_STREAM, ORGANIZER_GROUP, "sweeper", min_idle_ms=0)
    service = OrganizerService(bus, FailingStore(), ScriptedBackend({}), endpoints={}, consumer_name="o1")
    await service._reap_dead_letters()
    ((letter, _),) = [(e.id, e) for e in await bus.read(DEAD_LETTERS, after="0")]
    assert f"handling dead letter {letter} failed; it stays pending" in messages(caplog, logging.ERROR)
    assert bus.pending_count(DEAD_LETTERS, ORGANIZER_GROUP) == 1


class Gated:
    """Worker 1 returns at once; worker 2 waits for ``release`` (the organizer joins it last)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def run(self, task: WorkerTask) -> WorkerOutcome:
        from shared.agents import worker_segment

        if task.agent == "2":
            await self.release.wait()
        seg = worker_segment(task, text=f"w{task.agent}", returned=f"r{task.agent}")
        return WorkerOutcome(returned=f"r{task.agent}", segments=[seg])


async def test_a_worker_segment_is_stored_while_the_episode_still_runs(store: Store) -> None:
    bus = InProcessBus()
    gated = Gated()
    org = "<FORK-1>a</FORK-1><FORK-2>b</FORK-2><JOIN-1><JOIN-2>" + ANSWER
    service = make_service(bus, store, ScriptedBackend({"organizer": org}), endpoints={None: gated})
    sub = submission(mode="asyncthink", capacity=3)
    async with running(service):
        await publish(bus, sub)
        await until(lambda: "1" in store.segments(sub.episode_id), "worker 1's segment, stored live")
        assert service.episodes_done == 0 and store.episode(sub.episode_id).status == "running"
        gated.release.set()
        await until(lambda: service.episodes_done == 1, "the episode")
    segs = store.segments(sub.episode_id)
    assert (segs["1"].returned, segs["2"].returned) == ("r1", "r2")


@pytest.mark.parametrize("resume", [True, False])
async def test_the_organizers_checkpoint_is_stored_while_it_waits(store: Store, resume: bool) -> None:
    bus = InProcessBus()
    gated = Gated()
    org = "<FORK-1>a</FORK-1><FORK-2>b</FORK-2><JOIN-1><JOIN-2>" + ANSWER  # 50 tokens before it waits
    service = make_service(
        bus, store, ScriptedBackend({"organizer": org}), endpoints={None: gated}, resume=resume
    )
    sub = submission(mode="asyncthink", capacity=3)

    def partial_organizer() -> Any:
        row = store.segments(sub.episode_id).get("organizer")
        return row is not None and not row.wall_end and row.completion_ids

    async with running(service):
        await publish(bus, sub)
        await until(lambda: "1" in store.segments(sub.episode_id), "worker 1's segment")
        if resume:  # at least 32 new tokens, written 0.25 s after the join started waiting
            await until(partial_organizer, "the organizer's checkpoint")
            row = store.segments(sub.episode_id)["organizer"]
            assert row.text.startswith("<FORK-1>a</FORK-1><FORK-2>b</FORK-2><JOIN-1>r1</JOIN-1><JOIN-2>")
        else:
            assert not partial_organizer()  # no checkpointer without resume
        gated.release.set()
        await until(lambda: service.episodes_done == 1, "the episode")
    row = store.segments(sub.episode_id)["organizer"]
    assert row.wall_end and row.text.endswith(ANSWER)  # the complete segment replaced the checkpoint


class Silent:
    """A worker endpoint that never answers."""

    async def run(self, task: WorkerTask) -> WorkerOutcome:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_the_operator_caps_the_worker_timeout_a_submission_asks_for(store: Store) -> None:
    bus = InProcessBus()
    org = "<FORK-1>q</FORK-1><JOIN-1>" + ANSWER
    service = make_service(bus, store, ScriptedBackend({"organizer": org}), endpoints={None: Silent()},
                           worker_timeout_cap_s=0.2)  # fmt: skip
    sub = submission(mode="asyncthink", worker_timeout_s=600)  # asks for 10 minutes
    async with running(service):
        await publish(bus, sub)
        await until(lambda: service.episodes_done == 1, "the episode, its worker timed out after 0.2 s")
    segs = store.segments(sub.episode_id)
    assert segs["1"].error == "timeout"
    assert "<JOIN-1>[worker 1 timed out after 0.2s]</JOIN-1>" in segs["organizer"].text


async def test_interrupted_episodes_are_counted_one_by_one(store: Store) -> None:
    bus = InProcessBus()
    service = make_service(bus, store, ScriptedBackend({"organizer": ANSWER}, resumable=True))
    subs = [submission() for _ in range(4)]
    for n, sub in enumerate(subs):
        store.create(sub.episode_id, running=True)
        if n < 2:
            save_checkpoint(store, sub.episode_id)
    async with running(service):
        for sub in subs:
            await publish(bus, sub)
        await until(lambda: service.episodes_done == 4, "the four episodes")
    assert (service.episodes_resumed, service.episodes_rerun) == (2, 2)


async def test_a_resumed_organizer_logs_the_joins_in_its_prefix(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOG)
    bus = InProcessBus()
    org = "<FORK-1>q</FORK-1><JOIN-1>" + ANSWER
    backend = ScriptedBackend({"organizer": org, "1": "<RETURN>7</RETURN>"}, resumable=True)
    service = make_service(bus, store, backend)
    sub = submission(mode="asyncthink")
    store.create(sub.episode_id, running=True, mode="asyncthink")
    generated, injected = "<FORK-1>q</FORK-1><JOIN-1>", "7</JOIN-1>"  # 26 tokens decoded, 10 injected
    ids = [ord(c) for c in generated + injected]
    seg = SegmentRecord(agent="organizer", role="organizer", text=generated + injected, completion_ids=ids,
                        completion_mask=[1] * 26 + [0] * 10, generated_tokens=26)  # fmt: skip
    with store.factory() as session:
        repository.save_segment(session, episode_id=sub.episode_id, segment=seg)
    async with running(service):
        await publish(bus, sub)
        await until(lambda: service.episodes_done == 1, "the episode")
    assert service.episodes_resumed == 1
    assert (f"episode {sub.episode_id} resumed: the organizer continues from 26 tokens it had decoded (1 joined "
            "results in its prefix) instead of from its prompt") in messages(caplog, logging.WARNING)  # fmt: skip
    assert store.episode(sub.episode_id).status == "completed"


async def test_a_run_that_ends_after_another_organizer_claimed_it_is_not_stored_or_acked(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOG)
    bus = InProcessBus()
    # renewals every 15 s: none comes while the 0.3 s episode runs, so only the check before storing sees
    # that another organizer took the entry
    backend = ScriptedBackend({"organizer": ANSWER}, tokens_per_s=100.0)
    service = make_service(bus, store, backend, claim_idle_ms=60_000)
    sub = submission()
    async with running(service):
        entry_id = await publish(bus, sub)
        await until(lambda: service.in_progress == 1, "the episode to start")
        (taken,) = await bus.claim_stale(PROBLEMS_STREAM, ORGANIZER_GROUP, "rescuer", min_idle_ms=0)
        await until(lambda: service.in_progress == 0, "the run to end")
    assert backend.calls == 1 and service.episodes_done == 0
    assert store.episode(sub.episode_id).status == "running"  # the rescuer's to store
    assert bus.pending_count(PROBLEMS_STREAM, ORGANIZER_GROUP) == 1  # not acked here
    assert (
        f"episode {sub.episode_id} ran to its end here, but another organizer claimed its submission {entry_id}; "
        "leaving the result to it"
    ) in messages(caplog, logging.WARNING)


async def test_claims_take_no_more_than_the_free_places(store: Store) -> None:
    bus = InProcessBus()
    await bus.ensure_group(PROBLEMS_STREAM, ORGANIZER_GROUP)
    for _ in range(2):
        await publish(bus, submission())
    await bus.read_group(PROBLEMS_STREAM, ORGANIZER_GROUP, "dead", count=2, block_ms=0)  # both left pending
    backend = ScriptedBackend({"organizer": ANSWER}, tokens_per_s=100.0)
    service = make_service(bus, store, backend, max_concurrent_episodes=1, claim_idle_ms=100)

    def owners() -> list[str]:
        return sorted(
            p.consumer for p in bus._streams[PROBLEMS_STREAM].groups[ORGANIZER_GROUP].pending.values()
        )

    async with running(service):
        await until(lambda: service.in_progress == 1, "the first claimed episode")
        assert owners() == ["dead", "o1"]  # one place free: one entry claimed
        await until(lambda: service.episodes_done == 2, "both episodes, one after the other")


def steal(bus: InProcessBus, entry_id: str, consumer: str = "rescuer") -> None:
    """Another organizer takes one entry over (XCLAIM of that id)."""
    from shared.bus.inprocess import parse_id

    bus._streams[PROBLEMS_STREAM].groups[ORGANIZER_GROUP].pending[parse_id(entry_id)].consumer = consumer


async def test_each_lost_lease_stops_its_own_episode(store: Store) -> None:
    bus = InProcessBus()
    backend = ScriptedBackend({"organizer": ANSWER}, tokens_per_s=10.0)  # 3 s each
    service = make_service(bus, store, backend, claim_idle_ms=200)
    async with running(service):
        first, second = await publish(bus, submission()), await publish(bus, submission())
        await until(lambda: service.in_progress == 2, "both episodes")
        steal(bus, second)  # the later entry: the renewal must look past the first, still owned
        await until(lambda: service.leases_lost == 1, "the second lease lost")
        await until(lambda: second not in service._running, "the second episode to stop")
        assert first in service._running
        steal(bus, first)
        await until(lambda: service.leases_lost == 2, "the first lease lost too")
        await until(lambda: service.in_progress == 0, "both stopped")
    assert service.episodes_done == 0


async def test_a_busy_organizer_keeps_renewing_while_another_sweeps(store: Store) -> None:
    # Each organizer takes one episode at a time. While its one place is taken its loop only waits,
    # so its leases live by the renewer alone; the other organizer sweeps every 50 ms and would take
    # an entry idle for 200 ms. The 1.5 s episode runs once, and nobody loses a lease.
    bus = InProcessBus()
    backends = [ScriptedBackend({"organizer": ANSWER}, tokens_per_s=20.0) for _ in range(2)]
    services = [
        make_service(bus, store, b, consumer_name=f"o{n}", claim_idle_ms=200, max_concurrent_episodes=1)
        for n, b in enumerate(backends)
    ]
    async with running(services[0]), running(services[1]):
        await publish(bus, submission())
        await until(lambda: sum(s.episodes_done for s in services) == 1, "the episode", timeout_s=WAIT_S + 5)
    assert sum(b.calls for b in backends) == 1
    assert [s.leases_lost for s in services] == [0, 0]


async def test_a_dead_organizers_entry_is_claimed_while_another_episode_runs(store: Store) -> None:
    bus = InProcessBus()
    await bus.ensure_group(PROBLEMS_STREAM, ORGANIZER_GROUP)
    orphan = submission()
    await publish(bus, orphan)
    await bus.read_group(PROBLEMS_STREAM, ORGANIZER_GROUP, "dead", block_ms=0)
    slow = {"organizer": ANSWER}
    service = make_service(
        bus, store, ScriptedBackend(slow, tokens_per_s=10.0), claim_idle_ms=100, shutdown_grace_s=0.05
    )
    async with running(service):
        long_one = submission()
        await publish(bus, long_one)  # 3 s of decoding
        await until(lambda: service.in_progress >= 1, "the long episode")
        await until(lambda: store.episode(orphan.episode_id) is not None, "the orphan claimed and started")
        assert store.episode(long_one.episode_id).status == "running"  # claimed while it still runs
