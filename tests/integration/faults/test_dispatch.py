"""Issue 19: task messages written straight onto kombu's Redis lists (services.workers.dispatch).

* a real Celery worker process runs a message the endpoint wrote itself (no ``send_task``), and the
  worker's run holds its message, unacked and leased, until its outcome is out;
* a message's layout is the one ``send_task`` writes (same keys, the body decodes to the same args);
* critical-path scheduling: a queued fork whose join waits is moved to the list served first (and
  marked awaited, so its model server gets the priority too); one a worker already took is left alone;
  a fork nobody waits for any more is taken off its queue.

Uses the fault tests' Redis database (its keys are deleted at the start of the session).
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from bench.stack import celery_worker, service_env, wait_worker_ready
from services.workers.dispatch import AWAITED_PRIORITY, FORK_PRIORITY, QueueLayout, task_message
from shared.agents import PRIORITY_AWAITED
from shared.bus.inprocess import InProcessBus
from shared.messages import WorkerTask

pytestmark = pytest.mark.integration


def _task(episode: str, agent: str = "1") -> WorkerTask:
    return WorkerTask(
        episode_id=episode, agent=agent, fork_id=int(agent), parent="organizer", query="q", task="countdown",
        budget=64, worker_timeout_s=30,
    )  # fmt: skip


def test_the_message_is_what_send_task_writes(faults_redis: str) -> None:
    from services.workers.app import make_app

    app = make_app(faults_redis)
    direct = redis.Redis.from_url(faults_redis, decode_responses=True)
    queue = "human"  # declared, and consumed by no worker of these tests
    key = QueueLayout().key(queue, 3)
    try:
        app.send_task("asyncthink.run_worker", args=["{}"], queue=queue, task_id="t1", ignore_result=True, priority=3)
        [theirs] = direct.lrange(key, 0, -1)
        ours = task_message("asyncthink.run_worker", ["{}"], task_id="t1", queue=queue, priority=3)
        a, b = json.loads(theirs), json.loads(ours)
        assert set(a) == set(b) and set(a["headers"]) == set(b["headers"]) and set(a["properties"]) == set(b["properties"])
        assert base64.b64decode(a["body"]) == base64.b64decode(b["body"])
        assert a["properties"]["delivery_info"] == b["properties"]["delivery_info"]
        assert {k: v for k, v in a["headers"].items() if k not in ("origin", "argsrepr")} == {
            k: v for k, v in b["headers"].items() if k not in ("origin", "argsrepr")
        }
    finally:
        direct.delete(key)
        direct.close()


async def _until(read: Any, wanted: int, timeout_s: float = 20.0) -> int:
    """Poll ``read()`` every 20 ms until it gives ``wanted``; fail after ``timeout_s`` with the last value."""
    value = read()
    for _ in range(int(timeout_s / 0.02)):
        if value == wanted:
            return int(value)
        await asyncio.sleep(0.02)
        value = read()
    raise AssertionError(f"{value} after {timeout_s} s, wanted {wanted}")


async def _run_through_a_worker(faults_redis: str, tmp_path: Path) -> Any:
    from services.workers.app import make_app
    from services.workers.endpoint import CeleryWorkerEndpoint
    from shared.bus.redis_streams import RedisStreamsBus

    env = service_env(
        ASYNCTHINK_REDIS_URL=faults_redis, ASYNCTHINK_BACKEND_FACTORY="tests.scenarios.scripts:backend_factory",
        ASYNCTHINK_WORKER_TIMEOUT_S="30",
    )  # fmt: skip
    app = make_app(faults_redis)
    worker = celery_worker(env, tmp_path / "worker.log", concurrency=1, prefetch=2, name="dispatch-worker")
    bus = RedisStreamsBus(faults_redis)
    endpoint = CeleryWorkerEndpoint(bus, app)
    try:
        await asyncio.to_thread(wait_worker_ready, app, worker.start())
        assert endpoint.direct
        # the scenario suite's slow worker decodes for about 4 s; two of them on one thread, at once
        episodes = [f"worker_timeout--{uuid.uuid4().hex[:12]}" for _ in range(2)]
        runs = [asyncio.create_task(endpoint.run(_task(e))) for e in episodes]
        direct = redis.Redis.from_url(faults_redis)
        try:  # both runs in flight on one thread, each message leased (polled: the first takes about 4 s)
            held = await _until(lambda: direct.zcard("unacked_index"), 2)
        finally:
            direct.close()
        outcomes = await asyncio.wait_for(asyncio.gather(*runs), 30)
        return held, outcomes, endpoint.sent
    finally:
        await endpoint.close()
        await bus.close()
        worker.stop()


def test_a_celery_worker_runs_a_directly_written_message(faults_redis: str, tmp_path: Path) -> None:
    held, outcomes, sent = asyncio.run(_run_through_a_worker(faults_redis, tmp_path))
    assert sent == 2 and held == 2
    assert [o.returned for o in outcomes] == ["x", "x"] and all(o.error is None for o in outcomes)
    direct = redis.Redis.from_url(faults_redis)
    try:
        assert direct.zcard("unacked_index") == 0  # acked once their outcomes were out
    finally:
        direct.close()


class _App:
    """A Celery app's configuration only (no worker consumes the queue)."""

    def __init__(self, url: str) -> None:
        from services.workers.app import make_app

        self.conf = make_app(url).conf


async def _promote(faults_redis: str) -> tuple[list[Any], list[Any], int]:
    from services.workers.endpoint import CeleryWorkerEndpoint
    from shared.bus.redis_streams import RedisStreamsBus

    bus = RedisStreamsBus(faults_redis)
    queue = f"promote-{uuid.uuid4().hex[:8]}"
    endpoint = CeleryWorkerEndpoint(bus, _App(faults_redis), queue_for_endpoint={None: queue})
    layout = QueueLayout()
    episode = f"ep-{uuid.uuid4().hex[:8]}"
    try:
        runs = [asyncio.create_task(endpoint.run(_task(episode, str(i)))) for i in (1, 2, 3)]
        await _until(lambda: endpoint.sent, 3)  # all three pushed to the queue
        endpoint.awaited(_task(episode, "2"))  # the organizer waits at <JOIN-2>
        await bus.batcher().drain()
        front = await bus.client.lrange(layout.key(queue, AWAITED_PRIORITY), 0, -1)
        back = await bus.client.lrange(layout.key(queue, FORK_PRIORITY), 0, -1)
        runs[2].cancel()  # worker 3: nobody waits for it any more
        await asyncio.gather(runs[2], return_exceptions=True)
        await bus.batcher().drain()
        left = await bus.client.llen(layout.key(queue, FORK_PRIORITY))
        for r in runs[:2]:
            r.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
        return front, back, left
    finally:
        await endpoint.close()
        await bus.delete_prefix(queue)
        await bus.close()


def test_a_fork_its_organizer_waits_for_goes_first(faults_redis: str) -> None:
    front, back, left = asyncio.run(_promote(faults_redis))
    [promoted] = [json.loads(m) for m in front]
    args = json.loads(base64.b64decode(promoted["body"]))[0]
    task = WorkerTask.model_validate_json(args[0])
    assert task.agent == "2" and task.priority == PRIORITY_AWAITED and promoted["properties"]["priority"] == 0
    queued = [WorkerTask.model_validate_json(json.loads(base64.b64decode(json.loads(m)["body"]))[0][0]) for m in back]
    assert sorted(t.agent for t in queued) == ["1", "3"]  # the others keep their order behind it
    assert left == 1  # worker 3's message was taken back


def test_without_a_redis_broker_nothing_is_promoted() -> None:
    from services.workers.endpoint import CeleryWorkerEndpoint

    endpoint = CeleryWorkerEndpoint(InProcessBus(), object())
    assert not endpoint.direct
    endpoint.awaited(_task("ep"))  # no queue to reorder: a no-op
