"""A worker's outcome survives a short Redis outage (issue 13: results lost in ``finish()``).

The worker runtime talks to Redis through a :class:`~bench.tcp_proxy.TcpProxy`; the worker decodes for
about 4 s (the scenario suite's slow worker), and the proxy cuts Redis for 7 s from the moment the task's
``started`` notice is seen, so the done-marker write and the outcome's publish in ``finish()`` meet the cut
(the test checks that they did: ``finish()`` logged a retry). The outcome must be on the result
stream once Redis is back, exactly as computed, and computed once.

Before the fix, ``finish()`` let ``redis.exceptions.ConnectionError`` (not a subclass of Python's
``ConnectionError``) escape and the outcome was lost.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from bench.tcp_proxy import TcpProxy
from services.runtime import BACKEND_FACTORY_ENV
from shared.messages import WorkerOutcome, WorkerTask, results_stream
from tests.integration.faults.conftest import redis_db_path
from tests.scenarios.scripts import ScenarioBackend

pytestmark = pytest.mark.integration


def scenario_factory(settings: object = None) -> ScenarioBackend:
    return ScenarioBackend()


@pytest.fixture
def runtime_behind_proxy(proxy: TcpProxy, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from services.workers.tasks import WorkerRuntime
    from shared.config import Settings

    monkeypatch.setenv(BACKEND_FACTORY_ENV, f"{__name__}:scenario_factory")
    rt = WorkerRuntime(Settings(redis_url=proxy.url(path=redis_db_path())))
    yield rt
    rt.close()


@pytest.mark.parametrize("mode", ["reset", "blackhole"])
def test_outcome_published_after_a_redis_cut_during_finish(
    runtime_behind_proxy: Any, proxy: TcpProxy, faults_redis: str, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    from services.workers.tasks import done_key, run_once

    rt = runtime_behind_proxy
    episode_id = f"worker_timeout--{uuid.uuid4().hex[:12]}"  # worker "1" decodes at 10 tokens/s: ~4 s
    task = WorkerTask(
        episode_id=episode_id, agent="1", fork_id=1, parent="organizer", query="slow", task="countdown", budget=64,
    )
    direct = redis.Redis.from_url(faults_redis, decode_responses=True)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            rt.call(run_once(rt, task, final_attempt=False), timeout=120)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    try:
        rt.call(rt.redis.ping())  # connected through the proxy before the cut
        worker = threading.Thread(target=work)
        worker.start()
        deadline = time.monotonic() + 30
        while not any("started" in f for _, f in direct.xrange(results_stream(episode_id))):  # claimed, decoding
            assert time.monotonic() < deadline and worker.is_alive(), "the worker never started the task"
            time.sleep(0.02)
        with proxy.cut_for(7.0, mode):
            pass
        worker.join(timeout=120)
        assert not worker.is_alive()
        assert errors == [], f"run_once raised {errors[0]!r}; the outcome was lost"
        entries = [e for e in direct.xrange(results_stream(episode_id)) if "data" in e[1]]
        assert len(entries) == 1, entries
        _, fields = entries[0]
        outcome = WorkerOutcome.model_validate_json(fields["data"])
        assert fields["agent"] == "1" and outcome.returned == "x" and outcome.error is None
        assert direct.get(done_key(episode_id, "1")) == fields["data"]
        # the precondition: finish() did meet the cut (it retried), else this proved nothing
        retried = [r.getMessage() for r in caplog.records if "storing and publishing the outcome failed" in r.getMessage()]
        assert retried, "finish() never met the cut: the worker ended before or after it"
    finally:
        direct.delete(done_key(episode_id, "1"), results_stream(episode_id), f"asyncthink:episode:{episode_id}:events")
        direct.close()


def test_retryable_errors_include_the_redis_clients_own() -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from services.workers.tasks import RETRYABLE

    assert not issubclass(RedisConnectionError, ConnectionError)  # why they must be listed
    assert issubclass(RedisConnectionError, RETRYABLE) and issubclass(RedisTimeoutError, RETRYABLE)
