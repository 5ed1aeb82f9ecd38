"""A forked task lost on its way to a worker is sent again; one that a worker started is not.

Found by the fault soak: kombu's Redis transport pops a message (BRPOP) before the worker records it as
unacked, so a worker killed in that instant loses the task for good, and the organizer waited out its
worker timeout. The Celery endpoint now sends a task again when no worker has published its ``started``
notice ``resend_after_s`` after the send. Here a fake Celery app plays the worker on the in-process bus.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services.workers.endpoint import CeleryWorkerEndpoint
from shared.bus.inprocess import InProcessBus
from shared.messages import SegmentRecord, WorkerOutcome, WorkerTask, results_stream


class FakeCelery:
    """``send_task`` from the endpoint's send threads: the first ``lose`` sends vanish; the others start
    at once and publish their outcome after ``work_s``."""

    def __init__(self, bus: InProcessBus, loop: asyncio.AbstractEventLoop, *, lose: int, work_s: float) -> None:
        self.bus, self.loop, self.lose, self.work_s = bus, loop, lose, work_s
        self.sent: list[str] = []

    def send_task(self, name: str, args: list[str], queue: str, task_id: str, **options: Any) -> None:
        self.sent.append(task_id)
        if len(self.sent) <= self.lose:
            return  # popped by a worker that was killed before it recorded the message
        task = WorkerTask.model_validate_json(args[0])
        asyncio.run_coroutine_threadsafe(self._work(task, task_id), self.loop)

    async def _work(self, task: WorkerTask, token: str) -> None:
        stream = results_stream(task.episode_id)
        await self.bus.publish(stream, {"agent": task.agent, "started": token})
        await asyncio.sleep(self.work_s)
        seg = SegmentRecord(agent=task.agent, role="worker", fork_id=task.fork_id, parent=task.parent, returned="7")
        outcome = WorkerOutcome(returned="7", segments=[seg])
        await self.bus.publish(stream, {"agent": task.agent, "data": outcome.model_dump_json()})


def _task() -> WorkerTask:
    return WorkerTask(episode_id="ep", agent="1", fork_id=1, parent="organizer", query="q", task="countdown", budget=8)


async def test_a_task_no_worker_started_is_sent_again() -> None:
    bus = InProcessBus()
    app = FakeCelery(bus, asyncio.get_running_loop(), lose=1, work_s=0.05)
    endpoint = CeleryWorkerEndpoint(bus, app, read_block_ms=100, resend_after_s=0.3)
    try:
        outcome = await asyncio.wait_for(endpoint.run(_task()), 5)
    finally:
        await endpoint.close()
    assert outcome.returned == "7"
    assert len(app.sent) == 2 and endpoint.resent == 1


async def test_a_started_task_is_not_sent_again_however_long_it_runs() -> None:
    bus = InProcessBus()
    app = FakeCelery(bus, asyncio.get_running_loop(), lose=0, work_s=1.2)  # four resend periods
    endpoint = CeleryWorkerEndpoint(bus, app, read_block_ms=100, resend_after_s=0.3)
    try:
        outcome = await asyncio.wait_for(endpoint.run(_task()), 5)
    finally:
        await endpoint.close()
    assert outcome.returned == "7"
    assert len(app.sent) == 1 and endpoint.resent == 0


class QueuedCelery(FakeCelery):
    """Every task waits ``queued_s`` in the queue before a worker starts it (issue 19)."""

    def __init__(self, *args: Any, queued_s: float, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.queued_s = queued_s

    async def _work(self, task: WorkerTask, token: str) -> None:
        await asyncio.sleep(self.queued_s)
        await super()._work(task, token)


async def test_the_worker_timeout_runs_from_the_start_not_from_the_send() -> None:
    bus = InProcessBus()
    app = QueuedCelery(bus, asyncio.get_running_loop(), lose=0, work_s=0.1, queued_s=0.5)
    endpoint = CeleryWorkerEndpoint(bus, app, read_block_ms=100, resend_after_s=5.0, queue_timeout_s=2.0)
    task = _task().model_copy(update={"worker_timeout_s": 0.3})  # shorter than the time queued
    try:
        outcome = await asyncio.wait_for(endpoint.run(task), 5)
    finally:
        await endpoint.close()
    assert outcome.returned == "7"


async def test_a_task_no_worker_starts_times_out_after_the_queue_timeout() -> None:
    bus = InProcessBus()
    app = FakeCelery(bus, asyncio.get_running_loop(), lose=10, work_s=0.0)  # every send vanishes
    endpoint = CeleryWorkerEndpoint(bus, app, read_block_ms=100, resend_after_s=0.2, queue_timeout_s=0.5)
    try:
        with pytest.raises(TimeoutError, match="no worker started it"):
            await asyncio.wait_for(endpoint.run(_task()), 5)
    finally:
        await endpoint.close()
    assert endpoint.resent >= 1
