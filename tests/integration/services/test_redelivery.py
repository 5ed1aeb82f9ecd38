"""At-least-once delivery, handled: idempotent worker tasks, stale submissions claimed, segments saved live.

* A worker task delivered twice through Celery (a real worker process on Redis) computes once and
  publishes the same outcome twice (the done-marker); a backend connection error is retried with
  backoff by that worker and the outcome arrives; after the last retry an error outcome is published
  (``run_once`` with ``final_attempt``, which would otherwise take 31 s of backoff).
* A submission read by an organizer that died (never acked) is claimed by a live one and run.
* The store sink saves a worker's segment when its ``segment`` event arrives.

The Redis parts use ``ASYNCTHINK_SCENARIO_REDIS_URL`` (default ``redis://127.0.0.1:6379/9``) and are
skipped when it is unreachable, unless ``CI`` is set.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
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


class FlakyBackend(ScenarioBackend):
    """The scenario scripts; the first ``ASYNCTHINK_TEST_FAIL_FIRST`` generate calls of the process raise
    ConnectionError (a model server that is not up yet). Loaded by Celery worker processes."""

    failed = 0

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        if type(self).failed < int(os.environ.get("ASYNCTHINK_TEST_FAIL_FIRST", "0")):
            type(self).failed += 1
            raise ConnectionError(f"backend down (test), failure {type(self).failed}")
        return await super().generate(request)


def flaky_factory(settings: object = None) -> FlakyBackend:
    return FlakyBackend()


@pytest.fixture
def celery_process(tmp_path: Any) -> Iterator[Any]:
    """``start(fail_first)``: a real Celery worker process (threads pool) on the Redis database above,
    serving the scenario scripts through :class:`FlakyBackend`; returns the process and the Celery app."""
    import redis

    from bench.stack import celery_worker, service_env, wait_worker_ready
    from services.workers.app import make_app

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but Redis is unreachable: {exc}")
        pytest.skip(f"Redis unreachable (set CI=1 to make this a failure): {exc}")
    started: list[Any] = []

    def start(fail_first: int) -> tuple[Any, Any]:
        env = service_env(
            ASYNCTHINK_REDIS_URL=REDIS_URL,
            ASYNCTHINK_BACKEND_FACTORY=f"{__name__}:flaky_factory",
            ASYNCTHINK_TEST_FAIL_FIRST=str(fail_first),
            ASYNCTHINK_WORKER_TIMEOUT_S="30",
        )
        worker = celery_worker(
            env, tmp_path / f"worker-{len(started)}.log", name=f"redelivery-{uuid.uuid4().hex[:6]}"
        )
        started.append(worker)
        app = make_app(REDIS_URL)
        wait_worker_ready(app, worker.start())
        return worker, app

    yield start
    for worker in started:
        worker.stop()


def _wait_for(what: str, check: Any, worker: Any, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:g} s\n{worker.log_tail()}")
        time.sleep(0.05)


def _send(app: Any, task: WorkerTask) -> None:
    app.send_task("asyncthink.run_worker", args=[task.model_dump_json()], queue="model", ignore_result=True)


def _stream(direct: Any, episode_id: str) -> list[dict[str, str]]:
    return [fields for _, fields in direct.xrange(results_stream(episode_id))]


def _clean(direct: Any, episode_id: str) -> None:
    from services.workers.tasks import done_key
    from shared.messages import claim_key, events_stream

    direct.delete(done_key(episode_id, "1"), claim_key(episode_id, "1"), results_stream(episode_id),
                  events_stream(episode_id))  # fmt: skip


@pytest.fixture
def direct() -> Iterator[Any]:
    import redis

    client = redis.Redis.from_url(REDIS_URL, decode_responses=True, socket_connect_timeout=2)
    yield client
    client.close()


@pytest.mark.integration
def test_a_task_delivered_twice_through_celery_computes_once_and_republishes(
    celery_process: Any, direct: Any
) -> None:
    """Celery delivers at least once: the same task message a second time (as after a lost ack) reaches
    the worker, which finds the done-marker and republishes the stored outcome instead of computing."""
    worker, app = celery_process(fail_first=0)
    episode_id = f"fork_join--org20{uuid.uuid4().hex[:8]}"
    task = _task(episode_id)
    try:
        _send(app, task)
        _wait_for("the outcome", lambda: sum("data" in f for f in _stream(direct, episode_id)) == 1, worker)
        _send(app, task)  # the redelivery
        _wait_for(
            "the republished outcome",
            lambda: sum("data" in f for f in _stream(direct, episode_id)) == 2,
            worker,
        )
        entries = _stream(direct, episode_id)
        outcomes = [f for f in entries if "data" in f]
        assert outcomes[0] == outcomes[1]  # the same outcome twice
        assert WorkerOutcome.model_validate_json(outcomes[0]["data"]).returned == "2*3+4"
        assert sum("started" in f for f in entries) == 1  # computed once
        log_text = worker.log_tail(200_000)
        assert log_text.count(f"episode {episode_id} worker 1: already done, republishing") == 1
    finally:
        _clean(direct, episode_id)


@pytest.mark.integration
def test_a_backend_connection_error_is_retried_with_backoff_through_celery(
    celery_process: Any, direct: Any
) -> None:
    """The backend refuses the first two calls: the worker retries after 0.5-1 s, then after 1-2 s
    (``min(2**attempt, 60) * (0.5 + U/2)``), and the third attempt's outcome is published."""
    worker, app = celery_process(fail_first=2)
    episode_id = f"fork_join--org20{uuid.uuid4().hex[:8]}"
    try:
        _send(app, _task(episode_id))
        _wait_for("the outcome", lambda: any("data" in f for f in _stream(direct, episode_id)), worker)
        (outcome,) = [
            WorkerOutcome.model_validate_json(f["data"]) for f in _stream(direct, episode_id) if "data" in f
        ]
        assert (outcome.returned, outcome.error) == ("2*3+4", None)
        retries = re.findall(
            rf"episode {episode_id} worker 1: backend down \(test\), failure (\d); retry (\d) in ([0-9.]+)s",
            worker.log_tail(200_000),
        )
        assert [(f, r) for f, r, _ in retries] == [("1", "1"), ("2", "2")]
        first, second = (float(d) for _, _, d in retries)
        assert 0.5 <= first <= 1.0 and 1.0 <= second <= 2.0  # the delays logged (rounded to 0.1 s)
    finally:
        _clean(direct, episode_id)


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
