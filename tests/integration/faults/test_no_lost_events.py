"""Issue 19: no event is lost at any load, and a finished episode's streams and done-markers expire.

At 64 episodes at once, 199 of 1,024 ``worker_result`` events used to be lost: the bus client's pool
(redis-py's default of 100 connections) ran out, each episode held about two connections, and a
publish that found no connection failed and was dropped. Now the pool is bounded and waits, events
go through one command batcher per process, and a full batcher makes the episode wait.

Here everything is driven past its limits at once: an organizer with a Redis pool of 4 connections
(the blocking problems read and results read hold two of them) running 32 episodes at a time, a
batcher that holds at most 40 commands before callers wait, a segment writer whose batches stay
small, and a Celery worker process with 8 runs in flight (-c 2 x prefetch 4) for 48 episodes x 8
workers submitted at once. Every episode must complete once, and every event it should have
produced must be on its stream: started, a fork, join, worker_result and segment per worker and the
worker's own return, the answer and finished. Then each stream has a TTL (the organizer's
``stream_ttl_s``), and so has each done-marker.
"""

from __future__ import annotations

import asyncio
import collections
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from bench.scale import ANSWER, PAYLOAD, RATE_ENV, WORKER_TOKENS_ENV, ScaleBackend, fan_script
from bench.stack import celery_worker, service_env, wait_worker_ready
from shared.episode import EpisodeSettings
from shared.messages import PROBLEMS_STREAM, EpisodeEvent, SubmitProblem, done_key, events_stream
from shared.store import db, repository

pytestmark = pytest.mark.integration

EPISODES, FORKS, WORKER_TOKENS, RATE = 48, 8, 64, 4000.0
PER_FORK = ("fork", "join", "worker_result", "segment", "return")
ONCE = ("started", "answer", "finished")
TTL_S = 600.0


async def _run(faults_redis: str, faults_pg_url: str, tmp_path: Path) -> dict[str, Any]:
    from services.organizer.service import OrganizerService
    from services.workers.app import make_app
    from services.workers.endpoint import CeleryWorkerEndpoint
    from shared.bus.redis_streams import RedisStreamsBus

    env = service_env(
        ASYNCTHINK_REDIS_URL=faults_redis, ASYNCTHINK_BACKEND_FACTORY="bench.scale:backend_factory",
        ASYNCTHINK_WORKER_TIMEOUT_S="60", **{RATE_ENV: str(RATE), WORKER_TOKENS_ENV: str(WORKER_TOKENS)},
    )  # fmt: skip
    app = make_app(faults_redis)
    worker = celery_worker(env, tmp_path / "worker.log", concurrency=2, prefetch=4, name="lost-events-worker")
    bus = RedisStreamsBus(faults_redis, max_connections=4)
    bus.batcher().max_pending = 40  # callers wait beyond 40 queued commands
    engine = db.make_engine(faults_pg_url)
    endpoint = CeleryWorkerEndpoint(bus, app)
    service = OrganizerService(
        bus, db.session_factory(engine), ScaleBackend(RATE, WORKER_TOKENS), endpoints=endpoint.endpoints(),
        consumer_name=f"lost-events-{uuid.uuid4().hex[:6]}", max_concurrent_episodes=32, stream_ttl_s=TTL_S,
        max_write_backlog=20,
    )  # fmt: skip
    service.writer.max_batch = 4
    stop = asyncio.Event()
    try:
        await asyncio.to_thread(wait_worker_ready, app, worker.start())
        run = asyncio.create_task(service.run_forever(stop))
        ids = [f"fan{FORKS}--{uuid.uuid4().hex[:16]}" for _ in range(EPISODES)]
        settings = EpisodeSettings(capacity=FORKS + 1, worker_budget=WORKER_TOKENS + 16, worker_timeout_s=60)
        for eid in ids:
            sub = SubmitProblem(episode_id=eid, task="countdown", problem_id="lost", payload=PAYLOAD, settings=settings)
            await bus.publish(PROBLEMS_STREAM, {"data": sub.model_dump_json()})
        deadline = asyncio.get_running_loop().time() + 240
        while service.episodes_done < EPISODES:
            assert asyncio.get_running_loop().time() < deadline, f"{service.episodes_done} of {EPISODES} done"
            assert run.done() is False, run
            await asyncio.sleep(0.2)
        # the worker's own events are written with its outcome, before it; the organizer's may still be
        # queued: stop (which drains the running episodes), then send whatever the batcher still holds
        stop.set()
        await asyncio.wait_for(run, 30)
        await asyncio.wait_for(bus.batcher().drain(), 30)
        return {"ids": ids, "service": service, "batcher": bus.batcher(), "endpoint": endpoint}
    finally:
        stop.set()
        await endpoint.close()
        await bus.close()
        engine.dispose()
        worker.stop()


def test_every_event_arrives_past_every_limit(faults_redis: str, faults_pg_url: str, tmp_path: Path) -> None:
    out = asyncio.run(_run(faults_redis, faults_pg_url, tmp_path))
    direct = redis.Redis.from_url(faults_redis, decode_responses=True)
    engine = db.make_engine(faults_pg_url)
    try:
        lost: dict[str, dict[str, int]] = {}
        for eid in out["ids"]:
            kinds = collections.Counter(
                EpisodeEvent.model_validate_json(f["data"]).kind.value for _, f in direct.xrange(events_stream(eid))
            )
            missing = {k: FORKS - kinds[k] for k in PER_FORK if kinds[k] < FORKS}
            missing |= {k: 1 - kinds[k] for k in ONCE if kinds[k] < 1}
            if missing:
                lost[eid] = missing
            assert kinds["finished"] == 1 and kinds["started"] == 1, (eid, kinds)  # run once
            assert 0 < direct.ttl(events_stream(eid)) <= TTL_S  # expires after the episode
            assert 0 < direct.ttl(done_key(eid, "1")) <= TTL_S
        assert lost == {}, f"events lost: {lost}"
        assert out["batcher"].failed == 0 and out["service"].writer.failed == 0
        assert out["service"].backpressure_waits > 0  # the organizer took fewer episodes while writes lagged
        with db.session_factory(engine)() as session:
            for eid in out["ids"]:
                episode = repository.get_episode(session, eid)
                assert episode is not None and episode.status == "completed" and episode.answer == ANSWER
                segments = repository.episode_segments(session, eid)
                assert len(segments) == FORKS + 1
                workers = [s for s in segments if s.role == "worker"]
                expected = fan_script(FORKS, WORKER_TOKENS)["1"]
                assert all(s.text == expected and len(s.completion_ids) == len(expected) for s in workers)
                assert all(s.clock_end > s.clock_start for s in workers)  # spans written by the final save
    finally:
        direct.close()
        engine.dispose()
