"""The Celery worker endpoint's recovery paths, without servers: the in-process bus for results and a
Celery app on kombu's in-memory broker (which, not being Redis, makes the endpoint send through
``send_task`` and take tasks back through Celery's revoke broadcast).

* The result reader keeps reading after a failed read (the bus went away) and hands the outcome over.
* A task no worker started within the queue timeout is revoked: the broadcast carries its task id.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Queue

from services.workers.app import make_app
from services.workers.endpoint import RUN_WORKER_TASK, CeleryWorkerEndpoint
from shared.bus.base import Entry
from shared.bus.inprocess import InProcessBus
from shared.messages import WorkerOutcome, WorkerTask, results_stream
from tests.helpers import until


class FlakyReads(InProcessBus):
    """The in-process bus whose first ``fails`` ``read_many`` calls raise (Redis going away)."""

    def __init__(self, fails: int) -> None:
        super().__init__()
        self.fails = fails
        self.read_calls = 0

    async def read_many(self, positions: dict[str, str], **kw: Any) -> list[tuple[str, Entry]]:
        self.read_calls += 1
        if self.read_calls <= self.fails:
            raise ConnectionError("read_many: Redis down (test)")
        return await super().read_many(positions, **kw)


@pytest.fixture
def app() -> Iterator[Any]:
    celery = make_app(f"memory://localhost/{uuid.uuid4().hex}")  # a virtual host of its own
    celery.conf.result_backend = "cache+memory://"  # results are ignored; Celery still resolves a backend
    yield celery
    celery.close()


def worker_task(**kw: Any) -> WorkerTask:
    return WorkerTask(
        episode_id=f"ep-{uuid.uuid4().hex[:8]}", agent="1", fork_id=1, parent="organizer", query="q",
        task="countdown", budget=8, **kw,
    )  # fmt: skip


def sent_messages(app: Any, queue: str = "model") -> list[Any]:
    """The task messages on ``queue`` of the in-memory broker (taken off it)."""
    out = []
    with app.connection_for_write() as conn:
        q = Queue(queue, channel=conn.default_channel)
        while (msg := q.get(no_ack=True)) is not None:
            out.append(msg)
    return out





async def test_the_result_reader_retries_a_failed_read_and_delivers(
    app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "services.workers.endpoint")
    bus = FlakyReads(fails=2)
    endpoint = CeleryWorkerEndpoint(bus, app, read_block_ms=50)
    assert not endpoint.direct  # not a Redis broker: sent through send_task
    task = worker_task(worker_timeout_s=30)
    run = asyncio.create_task(endpoint.run(task))
    try:
        await until(lambda: bus.read_calls >= 3, "two failed reads and a third")
        (message,) = sent_messages(app)
        assert message.headers["task"] == RUN_WORKER_TASK
        assert WorkerTask.model_validate_json(message.payload[0][0]) == task
        # a worker takes it and publishes its outcome on the result stream
        await bus.publish(results_stream(task.episode_id), {"agent": "1", "started": "1"})
        outcome = WorkerOutcome(returned="2*3+4")
        await bus.publish(results_stream(task.episode_id), {"agent": "1", "data": outcome.model_dump_json()})
        got = await asyncio.wait_for(run, 15)
    finally:
        run.cancel()
        await endpoint.close()
    assert got == outcome
    failures = [r.getMessage() for r in caplog.records if "result streams failed" in r.getMessage()]
    # backoff from 0.05 s, doubled after each failure
    assert failures == [
        "reading 1 result streams failed (read_many: Redis down (test)); retrying in 0.05s",
        "reading 1 result streams failed (read_many: Redis down (test)); retrying in 0.10s",
    ]
    assert endpoint.sent == 1 and endpoint.resent == 0


async def test_a_task_no_worker_started_is_revoked(app: Any) -> None:
    bus = InProcessBus()
    endpoint = CeleryWorkerEndpoint(bus, app, read_block_ms=50, queue_timeout_s=0.2, resend_after_s=60)
    task = worker_task(worker_timeout_s=30)
    with app.connection_for_write() as conn:  # listen to the broadcasts every Celery worker hears
        watch = Queue(
            f"watch-{uuid.uuid4().hex[:6]}", app.control.mailbox.exchange, channel=conn.default_channel
        )
        watch.declare()
        try:
            with pytest.raises(TimeoutError, match="no worker started it within 0.2s"):
                await endpoint.run(task)
            (message,) = sent_messages(app)
            broadcasts: list[Any] = []

            def revoked() -> bool:
                msg = watch.get(no_ack=True)
                if msg is not None:
                    broadcasts.append(msg.payload)
                return any(b["method"] == "revoke" for b in broadcasts)

            await until(revoked, "the revoke broadcast")
        finally:
            await endpoint.close()
    (revoke,) = [b for b in broadcasts if b["method"] == "revoke"]
    assert revoke["arguments"]["task_id"] == message.headers["id"]
    assert endpoint._dispatches == {}  # nothing left waiting
