"""The engine's worker endpoint over Celery: dispatch a fork as a task, wait for its outcome on the bus.

:class:`CeleryWorkerEndpoint` implements :class:`shared.engine.WorkerEndpoint`. ``run(task)``

1. registers a future for ``(episode_id, agent)`` with the episode's result reader;
2. sends ``asyncthink.run_worker`` with the task as JSON to the queue of ``task.endpoint``
   (``queue_for_endpoint``: ``None`` -> ``model``, every tool (``"python"``, ``"verify"``) -> ``tool``); the organizer marks the
   episode running (a committed write) before the engine starts, so everything a worker depends on is
   committed before the dispatch. The send runs in a small thread pool, not on the event loop (a broker
   that does not answer would stall every episode of the process), and a send that cannot reach the
   broker is retried with jittered backoff until it can, within the engine's worker timeout;
3. awaits the future; if no worker has started the task (its ``started`` notice on the result stream)
   ``resend_after_s`` after the send, sends it again (then after twice as long, and so on, up to 8x):
   kombu's Redis transport pops a message before the worker records it as unacked, so a worker killed in
   that instant loses it for good, and nothing else would ever send it. Once a worker started it, its
   task lease covers that worker's death. One reader per episode tails ``results_stream(episode_id)`` with a blocking
   XREAD and resolves the waiting futures by the entry's ``agent`` field; nothing polls per worker. The
   reader starts with the episode's first waiter and stops with its last (its position is remembered,
   so a later fork of the same episode does not re-read old entries).

Duplicates (a redelivered task republishes the same outcome) resolve nobody and are dropped. On
cancellation (the engine's worker timeout, or the organizer answering before a join) the waiter is
removed and the Celery task is revoked (best effort: a task already running still finishes and
publishes, and the outcome is ignored).

Limits: the reader reads from the start of the stream the first time, so an organizer that resumes (or
re-runs) an episode after a crash sees the outcomes already published and the workers' done-markers
make the re-dispatched tasks republish them; outcomes of agents nobody waits for are not kept. A task
that waits in a long queue for more than ``resend_after_s`` is sent again (a cheap second copy: it
republishes the stored outcome or waits for the first copy's).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kombu.exceptions import OperationalError

from services.workers.tools import TOOL_NAMES
from shared.bus.base import Bus
from shared.messages import SegmentRecord, WorkerOutcome, WorkerTask, results_stream
from shared.retry import REDIS_ERRORS, backoff_delay

log = logging.getLogger(__name__)

DEFAULT_QUEUES: Mapping[str | None, str] = {None: "model", **dict.fromkeys(TOOL_NAMES, "tool")}
RUN_WORKER_TASK = "asyncthink.run_worker"
# what a broker that cannot be reached looks like to send_task (kombu wraps most of it)
SEND_ERRORS: tuple[type[BaseException], ...] = (OperationalError, ConnectionError, TimeoutError, OSError, *REDIS_ERRORS)


class _EpisodeReader:
    """Tails one episode's result stream and hands each outcome to the future waiting for its agent.

    The reader is never cancelled: redis-py 8's asyncio client can swallow a cancellation that lands
    while a command is being sent, leaving the blocked XREAD (and its pooled connection) alive. It
    stops by itself instead: it forgets each waiter it resolves and leaves its loop when none is left;
    a waiter that goes away unresolved (timeout, cancellation) wakes the blocked read with a sentinel
    entry (``agent`` empty) so the loop can see that nobody waits any more.
    """

    def __init__(self, bus: Bus, episode_id: str, after: str, block_ms: int, on_exit: Any) -> None:
        self.bus = bus
        self.episode_id = episode_id
        self.stream = results_stream(episode_id)
        self.after = after
        self.block_ms = block_ms
        self.on_exit = on_exit
        self.waiters: dict[str, asyncio.Future[WorkerOutcome]] = {}
        self.started: set[str] = set()  # agents a worker has started computing (their "started" notice)
        self.task: asyncio.Task[None] | None = None
        self._wakes: set[asyncio.Task[str]] = set()

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def register(self, agent: str) -> asyncio.Future[WorkerOutcome]:
        fut: asyncio.Future[WorkerOutcome] = asyncio.get_running_loop().create_future()
        self.waiters[agent] = fut
        if not self.running:
            self.task = asyncio.create_task(self._loop(), name=f"results-reader-{self.episode_id}")
        return fut

    def discard(self, agent: str, fut: asyncio.Future[WorkerOutcome]) -> None:
        """Forget an unresolved waiter; wake the blocked read if it was the last one."""
        if self.waiters.get(agent) is fut:
            del self.waiters[agent]
            if not self.waiters and self.running:
                wake = asyncio.create_task(self.bus.publish(self.stream, {"agent": "", "wake": "1"}))
                self._wakes.add(wake)
                wake.add_done_callback(self._woken)

    def _woken(self, wake: asyncio.Task[str]) -> None:
        self._wakes.discard(wake)
        if not wake.cancelled() and wake.exception() is not None:  # Redis down: the read times out by itself
            log.debug("episode %s: waking the result reader failed: %s", self.episode_id, wake.exception())

    async def _loop(self) -> None:
        delay = 0.05
        try:
            while self.waiters:
                try:
                    entries = await self.bus.read(self.stream, after=self.after, count=100, block_ms=self.block_ms)
                    delay = 0.05
                except Exception as exc:  # the bus is down: keep trying; the engine's timeout bounds the wait
                    log.warning(
                        "episode %s: reading %s failed (%s); retrying in %.2fs", self.episode_id, self.stream, exc, delay
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                for entry in entries:
                    self.after = entry.id
                    if "started" in entry.fields:  # a worker began computing it: no need to send it again
                        self.started.add(entry.fields.get("agent", ""))
                        continue
                    fut = self.waiters.pop(entry.fields.get("agent", ""), None)
                    if fut is None or fut.done():
                        continue  # a duplicate, a wake-up, or a worker nobody waits for any more
                    try:
                        fut.set_result(WorkerOutcome.model_validate_json(entry.fields.get("data", "")))
                    except Exception as exc:  # a malformed entry fails only its own worker
                        fut.set_exception(ValueError(f"bad outcome entry {entry.id} on {self.stream}: {exc}"))
        finally:
            self.on_exit(self)


class CeleryWorkerEndpoint:
    """A :class:`shared.engine.WorkerEndpoint` that runs workers as Celery tasks (see the module doc)."""

    def __init__(
        self,
        bus: Bus,
        celery_app: Any,
        *,
        queue_for_endpoint: Mapping[str | None, str] | None = None,
        read_block_ms: int = 5000,
        remember_episodes: int = 4096,
        send_threads: int = 8,
        resend_after_s: float = 10.0,
    ) -> None:
        self.bus = bus
        self.app = celery_app
        self.queue_for_endpoint = dict(DEFAULT_QUEUES if queue_for_endpoint is None else queue_for_endpoint)
        self.read_block_ms = read_block_ms
        self.resend_after_s = resend_after_s
        self.resent = 0  # tasks sent again because no worker started them in time
        self._readers: dict[str, _EpisodeReader] = {}
        self._positions: OrderedDict[str, str] = OrderedDict()  # last read id of finished readers
        self._remember = remember_episodes
        # Sends run here, off the event loop: a broker that does not answer must not stall every episode.
        self._send_pool = ThreadPoolExecutor(max_workers=send_threads, thread_name_prefix="celery-send")

    def endpoints(self) -> dict[str | None, CeleryWorkerEndpoint]:
        """The engine's endpoint map: this endpoint for every worker kind it has a queue for."""
        return dict.fromkeys(self.queue_for_endpoint, self)

    def _reader(self, episode_id: str) -> _EpisodeReader:
        reader = self._readers.get(episode_id)
        if reader is None:
            after = self._positions.pop(episode_id, "0")
            reader = _EpisodeReader(self.bus, episode_id, after, self.read_block_ms, self._reader_exited)
            self._readers[episode_id] = reader
        return reader

    def _reader_exited(self, reader: _EpisodeReader) -> None:
        """A reader left its loop: forget it (remembering its position) unless it has waiters again."""
        if reader.waiters or self._readers.get(reader.episode_id) is not reader:
            return
        del self._readers[reader.episode_id]
        self._positions[reader.episode_id] = reader.after
        while len(self._positions) > self._remember:
            self._positions.popitem(last=False)

    async def run(self, task: WorkerTask) -> WorkerOutcome:
        queue = self.queue_for_endpoint.get(task.endpoint)
        if queue is None:
            known = ", ".join(sorted(str(k) for k in self.queue_for_endpoint if k)) or "none"
            error = "unknown_endpoint"
            return WorkerOutcome(
                returned=f"[no worker queue for endpoint '{task.endpoint}'; known: {known}]",
                segments=[
                    SegmentRecord(
                        agent=task.agent, role="worker", fork_id=task.fork_id, parent=task.parent,
                        endpoint=task.endpoint, query=task.query, error=error,
                    )
                ],
                error=error,
            )
        reader = self._reader(task.episode_id)
        reader.started.discard(task.agent)
        fut = reader.register(task.agent)
        task_ids = [uuid.uuid4().hex]
        try:
            await self._send(task, queue, task_ids[-1])
            wait_s = self.resend_after_s
            while True:
                done, _ = await asyncio.wait([fut], timeout=wait_s)
                if done:
                    return fut.result()
                if task.agent in reader.started:
                    wait_s = self.resend_after_s  # a worker has it: its lease covers its death from now on
                    continue
                # Sent, but no worker started it: still queued behind others, or lost on its way (the
                # Redis transport pops a message before the worker records it; a worker killed in between
                # never had it). Send it again; a copy that finds the outcome stored republishes it.
                log.warning(
                    "episode %s worker %s: no worker started it %.0fs after it was sent; sending it again",
                    task.episode_id, task.agent, wait_s,
                )
                task_ids.append(uuid.uuid4().hex)
                await self._send(task, queue, task_ids[-1])
                self.resent += 1
                wait_s = min(wait_s * 2, 8 * self.resend_after_s)
        except asyncio.CancelledError:
            for task_id in task_ids:
                self._revoke(task_id)
            raise
        finally:
            reader.discard(task.agent, fut)

    async def _send(self, task: WorkerTask, queue: str, task_id: str) -> None:
        """Send the task from the send threads; a broker that cannot be reached is retried with jittered
        backoff until it can (the engine's worker timeout bounds the wait). A retried send may reach the
        broker twice; the task is idempotent."""
        loop = asyncio.get_running_loop()
        send = functools.partial(
            self.app.send_task, RUN_WORKER_TASK, args=[task.model_dump_json()], queue=queue, task_id=task_id,
            ignore_result=True, retry=False,
        )
        attempt = 0
        while True:
            try:
                await loop.run_in_executor(self._send_pool, send)
                if attempt:
                    log.info("episode %s worker %s: sent after %d retries", task.episode_id, task.agent, attempt)
                return
            except SEND_ERRORS as exc:
                attempt += 1
                delay = backoff_delay(attempt, base_s=0.1, cap_s=2.0)
                log.warning(
                    "episode %s worker %s: sending the task failed (%s); retry %d in %.2fs",
                    task.episode_id, task.agent, exc, attempt, delay,
                )
                await asyncio.sleep(delay)

    def _revoke(self, task_id: str) -> None:
        def revoke() -> None:
            with contextlib.suppress(Exception):
                self.app.control.revoke(task_id)

        asyncio.get_running_loop().run_in_executor(None, revoke)

    async def close(self) -> None:
        """Fail every waiting worker and wake the readers so they exit."""
        for reader in list(self._readers.values()):
            for agent, fut in list(reader.waiters.items()):
                fut.cancel()
                reader.discard(agent, fut)
        tasks = [r.task for r in self._readers.values() if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        self._send_pool.shutdown(wait=False, cancel_futures=True)
