"""A Celery worker killed with SIGKILL mid-task: its task runs again within seconds, not an hour.

Issue 13: the Redis transport's visibility timeout was 3600 s, so a task whose worker was ``kill -9``'d
stayed invisible for an hour (the organizer's worker timeout was the only fallback). Now a task's
visibility is a short lease that the worker running it renews (a heartbeat), so:

* a task whose worker dies is delivered again about one lease after the worker's last heartbeat
  (``ASYNCTHINK_TASK_LEASE_S=2`` here) and its outcome arrives;
* a task that runs longer than the lease on a live worker is not delivered a second time.

A real Celery worker process (``--pool=threads``) on the fault tests' Redis database runs the scenario
suite's slow worker (about 4 s of decoding).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from bench.stack import ServiceProcess, celery_worker, service_env, wait_worker_ready
from shared.messages import WorkerOutcome, WorkerTask, results_stream

pytestmark = pytest.mark.integration

LEASE_S = 2.0


@pytest.fixture
def worker_env(faults_redis: str) -> dict[str, str]:
    return service_env(
        ASYNCTHINK_REDIS_URL=faults_redis,
        ASYNCTHINK_BACKEND_FACTORY="tests.scenarios.scripts:backend_factory",
        ASYNCTHINK_TASK_LEASE_S=str(LEASE_S),
        ASYNCTHINK_WORKER_TIMEOUT_S="30",
    )


@pytest.fixture
def app(faults_redis: str) -> Any:
    from services.workers.app import make_app

    return make_app(faults_redis)


@pytest.fixture
def direct(faults_redis: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(faults_redis, decode_responses=True)
    yield client
    client.close()


def _slow_task() -> WorkerTask:
    episode_id = f"worker_timeout--{uuid.uuid4().hex[:12]}"  # its worker "1" decodes for about 4 s
    return WorkerTask(
        episode_id=episode_id, agent="1", fork_id=1, parent="organizer", query="slow", task="countdown", budget=64,
    )


def _outcomes(direct: redis.Redis, stream: str) -> list[Any]:
    """The outcome entries of a result stream (not the ``started`` notices)."""
    return [e for e in direct.xrange(stream) if "data" in e[1]]


def _started(direct: redis.Redis, stream: str) -> int:
    """How many times a worker has started the task (its ``started`` notices)."""
    return sum("started" in f for _, f in direct.xrange(stream))


def _ms(entry_id: str) -> int:
    return int(entry_id.split("-")[0])


def _send(app: Any, task: WorkerTask) -> None:
    app.send_task("asyncthink.run_worker", args=[task.model_dump_json()], queue="model", ignore_result=True)


def _wait_for(what: str, timeout_s: float, check: Any, *workers: ServiceProcess) -> float:
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout_s:
            logs = "\n".join(f"--- {w.name}\n{w.log_tail()}" for w in workers)
            raise AssertionError(f"{what}: not within {timeout_s:g} s\n{logs}")
        time.sleep(0.05)
    return time.monotonic() - t0


def test_a_killed_workers_task_is_delivered_again_within_seconds(
    tmp_path: Path, worker_env: dict[str, str], app: Any, direct: redis.Redis
) -> None:
    first = celery_worker(worker_env, tmp_path / "first.log", name="first")
    second = celery_worker(worker_env, tmp_path / "second.log", name="second")
    task = _slow_task()
    stream = results_stream(task.episode_id)
    try:
        wait_worker_ready(app, first.start())
        _send(app, task)
        _wait_for("the first worker takes the task", 10, lambda: direct.zcard("unacked_index") >= 1, first)
        _wait_for("the first worker starts decoding", 10, lambda: _started(direct, stream) == 1, first)
        first.kill9()  # mid-way through its ~4 s of decoding: it has started and not answered
        assert _outcomes(direct, stream) == []
        wait_worker_ready(app, second.start())
        # within seconds: lease (2 s) + a restore sweep (1 s) + ~4 s of decoding + the second worker's start;
        # 45 s is the generous bound past which the old one-hour visibility is what happened
        _wait_for("the outcome after the kill", 45, lambda: len(_outcomes(direct, stream)) >= 1, second)
        (entry,) = _outcomes(direct, stream)
        outcome = WorkerOutcome.model_validate_json(entry[1]["data"])
        assert outcome.returned == "x" and outcome.error is None
        assert _started(direct, stream) == 2  # delivered again: the second worker started it over
    finally:
        first.kill9()
        second.stop()
        direct.delete(stream, f"asyncthink:worker-done:{task.episode_id}:1", f"asyncthink:episode:{task.episode_id}:events",
                      f"asyncthink:worker-claim:{task.episode_id}:1")


def test_a_task_longer_than_its_lease_runs_once_on_a_live_worker(
    tmp_path: Path, worker_env: dict[str, str], app: Any, direct: redis.Redis
) -> None:
    worker = celery_worker(worker_env, tmp_path / "worker.log", name="live")
    task = _slow_task()
    stream = results_stream(task.episode_id)
    try:
        wait_worker_ready(app, worker.start())
        _send(app, task)
        _wait_for("the outcome", 30, lambda: len(_outcomes(direct, stream)) >= 1, worker)
        # the precondition: the task outlived its lease (stream ids are the server's milliseconds), so a lease
        # that was not renewed would have expired while it ran
        (started_id,) = [i for i, f in direct.xrange(stream) if "started" in f]
        (outcome_id, _) = _outcomes(direct, stream)[0]
        assert _ms(outcome_id) - _ms(started_id) > LEASE_S * 1000
        time.sleep(2 * LEASE_S + 1.5)  # what is tested: a second delivery would have published by now
        assert len(_outcomes(direct, stream)) == 1, "the task was delivered again while its worker was alive"
        assert sum("started" in f for _, f in direct.xrange(stream)) == 1  # and computed once
        assert "already done, republishing" not in worker.log_tail(200_000)
        assert direct.zcard("unacked_index") == 0  # acked
    finally:
        worker.stop()
        direct.delete(stream, f"asyncthink:worker-done:{task.episode_id}:1", f"asyncthink:episode:{task.episode_id}:events",
                      f"asyncthink:worker-claim:{task.episode_id}:1")
