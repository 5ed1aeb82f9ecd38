"""At-least-once delivery, handled: idempotent worker tasks, stale submissions claimed, segments saved live.

* A worker task delivered twice computes once and publishes the same outcome twice (the done-marker);
  a backend connection error is retried, and after the last retry an error outcome is published.
* A submission read by an organizer that died (never acked) is claimed by a live one and run.
* The store sink saves a worker's segment when its ``segment`` event arrives.

The Redis parts use ``ASYNCTHINK_SCENARIO_REDIS_URL`` (default ``redis://127.0.0.1:6379/9``) and are
skipped when it is unreachable, unless ``CI`` is set.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from services.organizer.service import OrganizerService
from services.runtime import BACKEND_FACTORY_ENV, StoreSink
from shared.backends.base import GenerateRequest, GenerateResult
from shared.bus.inprocess import InProcessBus
from shared.episode import EpisodeSettings
from shared.messages import (
    ORGANIZER_GROUP,
    PROBLEMS_STREAM,
    EpisodeEvent,
    SegmentRecord,
    SubmitProblem,
    WorkerOutcome,
    WorkerTask,
    results_stream,
)
from shared.store import db, repository
from tests.scenarios.scripts import PAYLOAD, ScenarioBackend

REDIS_URL = os.environ.get("ASYNCTHINK_SCENARIO_REDIS_URL", "redis://127.0.0.1:6379/9")


class CountingBackend(ScenarioBackend):
    """The scenario scripts, counting calls; ``fail`` makes every call raise ConnectionError."""

    calls = 0
    fail = False

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        type(self).calls += 1
        if type(self).fail:
            raise ConnectionError("backend down (test)")
        return await super().generate(request)


def counting_factory(settings: object = None) -> CountingBackend:
    return CountingBackend()


@pytest.fixture
def worker_runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    import redis

    from services.workers.tasks import WorkerRuntime
    from shared.config import Settings

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but Redis is unreachable: {exc}")
        pytest.skip(f"Redis unreachable (set CI=1 to make this a failure): {exc}")
    monkeypatch.setenv(BACKEND_FACTORY_ENV, f"{__name__}:counting_factory")
    CountingBackend.calls, CountingBackend.fail = 0, False
    rt = WorkerRuntime(Settings(redis_url=REDIS_URL))
    yield rt
    rt.close()


def _task(episode_id: str) -> WorkerTask:
    return WorkerTask(
        episode_id=episode_id, agent="1", fork_id=1, parent="organizer", query="find a product route",
        task="countdown", budget=64,
    )


async def _results(rt: Any, episode_id: str) -> list[dict[str, str]]:
    """The outcomes on the episode's result stream (not the workers' ``started`` notices)."""
    entries = await rt.bus.read(results_stream(episode_id), after="0")
    return [e.fields for e in entries if "data" in e.fields]


@pytest.mark.integration
def test_redelivered_worker_task_republishes_the_same_outcome(worker_runtime: Any) -> None:
    from services.workers.tasks import done_key, run_once

    rt = worker_runtime
    episode_id = f"fork_join--{uuid.uuid4().hex[:12]}"
    task = _task(episode_id)
    try:
        rt.call(run_once(rt, task, final_attempt=False))
        calls = CountingBackend.calls
        rt.call(run_once(rt, task, final_attempt=False))  # the redelivery
        assert CountingBackend.calls == calls  # not recomputed
        published = rt.call(_results(rt, episode_id))
        assert len(published) == 2 and published[0] == published[1]
        outcome = WorkerOutcome.model_validate_json(published[0]["data"])
        assert published[0]["agent"] == "1" and outcome.returned == "2*3+4"
    finally:
        rt.call(rt.redis.delete(done_key(episode_id, "1"), results_stream(episode_id)))


@pytest.mark.integration
def test_backend_connection_errors_retry_then_publish_an_error(worker_runtime: Any) -> None:
    from services.workers.tasks import done_key, run_once

    rt = worker_runtime
    CountingBackend.fail = True
    episode_id = f"fork_join--{uuid.uuid4().hex[:12]}"
    task = _task(episode_id)
    try:
        with pytest.raises(ConnectionError):  # Celery retries this with backoff
            rt.call(run_once(rt, task, final_attempt=False))
        assert rt.call(_results(rt, episode_id)) == []
        rt.call(run_once(rt, task, final_attempt=True))  # the last retry gives up
        (published,) = rt.call(_results(rt, episode_id))
        outcome = WorkerOutcome.model_validate_json(published["data"])
        assert outcome.error is not None and "backend unreachable" in outcome.error
    finally:
        rt.call(rt.redis.delete(done_key(episode_id, "1"), results_stream(episode_id)))


async def test_stale_submission_of_a_dead_organizer_is_claimed(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    db.migrate(url)
    engine = db.make_engine(url)
    bus = InProcessBus()
    await bus.ensure_group(PROBLEMS_STREAM, ORGANIZER_GROUP)
    episode_id = f"fork_join--{uuid.uuid4().hex[:12]}"
    submission = SubmitProblem(
        episode_id=episode_id, task="countdown", problem_id="p", payload=PAYLOAD,
        settings=EpisodeSettings(worker_budget=64),
    )
    await bus.publish(PROBLEMS_STREAM, {"data": submission.model_dump_json()})
    # An organizer reads it and dies without acking.
    assert len(await bus.read_group(PROBLEMS_STREAM, ORGANIZER_GROUP, "dead", block_ms=0)) == 1
    service = OrganizerService(
        bus, db.session_factory(engine), ScenarioBackend(), endpoints={}, consumer_name="alive", claim_idle_ms=100,
        read_block_ms=50,
    )
    stop = asyncio.Event()
    runner = asyncio.create_task(service.run_forever(stop))
    try:
        for _ in range(200):
            await asyncio.sleep(0.02)
            if service.episodes_done and not service.in_progress:
                break
    finally:
        stop.set()
        await asyncio.wait_for(runner, 5)
        engine.dispose()
    assert service.episodes_done == 1
    assert bus.pending_count(PROBLEMS_STREAM, ORGANIZER_GROUP) == 0
    with db.session_factory(db.make_engine(url))() as session:
        episode = repository.get_episode(session, episode_id)
        assert episode is not None and episode.status == "completed"


async def test_store_sink_saves_a_worker_segment_when_it_completes(tmp_path: Any) -> None:
    from shared.tasks import get_task

    url = f"sqlite:///{tmp_path / 'store.db'}"
    db.migrate(url)
    engine = db.make_engine(url)
    factory = db.session_factory(engine)
    task = get_task("countdown")
    with factory() as session:
        repository.create_episode(
            session, episode_id="e1", problem=task.problem_from_payload(PAYLOAD, "p"), mode="asyncthink",
            capacity=2, model_id="m",
        )
    segment = SegmentRecord(agent="1", role="worker", fork_id=1, parent="organizer", text="t", returned="r")
    sink = StoreSink(factory, "e1")
    await sink.emit(EpisodeEvent(episode_id="e1", kind="fork", data={}))  # ignored
    await sink.emit(EpisodeEvent(episode_id="e1", kind="segment", agent="1", data={"segment": segment.model_dump()}))
    with factory() as session:
        (row,) = repository.episode_segments(session, "e1")
        assert (row.agent, row.returned, row.fork_id) == ("1", "r", 1)
    engine.dispose()
