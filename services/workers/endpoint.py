"""The engine's worker endpoint over Celery: dispatch a fork as a task, wait for its outcome on the bus.

:class:`CeleryWorkerEndpoint` implements :class:`shared.engine.WorkerEndpoint`. ``run(task)``

1. registers a future for ``(episode_id, agent)`` with the process's result reader;
2. sends ``asyncthink.run_worker`` with the task as JSON to the queue of ``task.endpoint``
   (``queue_for_endpoint``: ``None`` -> ``model``, every tool (``"python"``, ``"verify"``) -> ``tool``). With a Redis broker the
   message is written straight onto kombu's queue list (:mod:`.dispatch`), batched with the process's
   other Redis writes, so a send costs no thread, no Celery call and, under load, a share of one round
   trip; with another broker ``send_task`` runs in a small thread pool. A send that cannot reach the
   broker is retried with jittered backoff. The organizer marks the episode running (a committed
   write) before the engine starts, so everything a worker depends on is committed before the dispatch;
3. awaits the future. The worker timeout runs from the worker's ``started`` notice (published on the
   result stream when a worker takes the task), so time spent queued behind other tasks does not count
   against it; a task no worker starts within ``queue_timeout_s`` (default: the worker timeout) times
   out as well. If no worker has started the task ``resend_after_s`` after the send, it is sent again
   (then after twice as long, and so on, up to 8x): kombu's Redis transport pops a message before the
   worker records it as unacked, so a worker killed in that instant loses it for good, and nothing else
   would ever send it. Once a worker started it, its task lease covers that worker's death.

One reader per process tails the result streams of every episode with a waiting worker in a single
blocking XREAD (``Bus.read_many``) and resolves futures by the entry's ``agent`` field; a new episode
wakes it through a stream of its own (``asyncthink:organizer-wake:<id>``), so the process holds one
blocking connection for results whatever the number of episodes. An episode's position is remembered
after its last waiter leaves (a later fork does not re-read old entries).

Scheduling (``scheduling="critical-path"``, the default): forks are queued at
:data:`~services.workers.dispatch.FORK_PRIORITY`; when the organizer reaches ``<JOIN-i>`` of a worker no
worker has started yet, the engine calls :meth:`CeleryWorkerEndpoint.awaited` and the task is promoted
to the front (:data:`~services.workers.dispatch.PROMOTE_LUA`), marked ``priority=PRIORITY_AWAITED`` so the
worker passes that priority on to its model server (SGLang's ``priority``). ``"fifo"`` never promotes.

Duplicates (a redelivered task republishes the same outcome) resolve nobody and are dropped. On
cancellation (the worker timeout, or the organizer answering before a join) the waiter is removed and
the task is taken off its queue if no worker popped it yet (``LREM``; Celery's revoke broadcast with
another broker): a task already running still finishes and publishes, and the outcome is ignored.

Limits: the reader reads an episode's stream from its start the first time, so an organizer that resumes
(or re-runs) an episode after a crash sees the outcomes already published and the workers' done-markers
make the re-dispatched tasks republish them. A task that waits in a long queue for more than
``resend_after_s`` is sent again (a cheap second copy: it republishes the stored outcome or waits for the
first copy's). One XREAD over many streams costs Redis time in the number of streams, paid again each
time an outcome arrives: thousands of episodes in one organizer process would make it a hot spot.
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
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from kombu.exceptions import OperationalError

from services.workers.dispatch import AWAITED_PRIORITY, FORK_PRIORITY, PROMOTE_LUA, QueueLayout, task_message
from services.workers.tools import TOOL_NAMES
from shared.agents import PRIORITY_AWAITED
from shared.bus.base import Bus
from shared.messages import SegmentRecord, WorkerOutcome, WorkerTask, results_stream
from shared.retry import REDIS_ERRORS, backoff_delay

log = logging.getLogger(__name__)

DEFAULT_QUEUES: Mapping[str | None, str] = {None: "model", **dict.fromkeys(TOOL_NAMES, "tool")}
RUN_WORKER_TASK = "asyncthink.run_worker"
# what a broker that cannot be reached looks like to send_task (kombu wraps most of it)
SEND_ERRORS: tuple[type[BaseException], ...] = (OperationalError, ConnectionError, TimeoutError, OSError, *REDIS_ERRORS)
SCHEDULING = ("critical-path", "fifo")
WAKE_PREFIX = "asyncthink:organizer-wake:"
RESULTS_PREFIX = "asyncthink:episode:"


def _episode_of(stream: str) -> str:
    """The episode id of a result stream (``asyncthink:episode:<id>:results``)."""
    return stream[len(RESULTS_PREFIX) : -len(":results")]


def _redis_target(url: str) -> tuple[str, str, int, str, str]:
    parts = urlsplit(url)
    db = (parts.path or "/0").strip("/") or "0"
    return (parts.scheme, parts.hostname or "", parts.port or 6379, db, parts.password or "")


class _ResultsReader:
    """Tails the result streams of every episode with a waiting worker in one blocking XREAD.

    The reader is never cancelled (redis-py's asyncio client can swallow a cancellation that lands while
    a command is being sent, leaving the blocked XREAD and its connection alive): a registration for an
    episode outside the read in flight, and ``close``, wake it through its own wake stream instead.
    """

    def __init__(self, bus: Bus, block_ms: int, remember: int, wake: Any) -> None:
        self.bus = bus
        self.block_ms = block_ms
        self.remember = remember
        self._wake_send = wake
        self.wake_stream = f"{WAKE_PREFIX}{uuid.uuid4().hex}"
        self._wake_after = "0"
        self.waiters: dict[str, dict[str, asyncio.Future[WorkerOutcome]]] = {}
        self.started: dict[tuple[str, str], asyncio.Future[None]] = {}
        self.positions: dict[str, str] = {}  # episodes being read -> the last entry id read
        self._remembered: OrderedDict[str, str] = OrderedDict()  # episodes no longer read -> last id
        self._reading: set[str] = set()  # the episodes of the XREAD in flight
        self._woken = False  # a wake is on its way for the read in flight
        self._more = asyncio.Event()
        make = getattr(bus, "stream_reader", None)  # a connection of its own, where the bus has one
        self._source: Any = make() if make is not None else bus
        self.task: asyncio.Task[None] | None = None
        self.closing = False
        self.reads = 0

    def register(self, episode_id: str, agent: str) -> tuple[asyncio.Future[WorkerOutcome], asyncio.Future[None]]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[WorkerOutcome] = loop.create_future()
        started: asyncio.Future[None] = loop.create_future()
        self.waiters.setdefault(episode_id, {})[agent] = fut
        self.started[(episode_id, agent)] = started
        if episode_id not in self.positions:
            self.positions[episode_id] = self._remembered.pop(episode_id, "0")
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._loop(), name="results-reader")
        elif episode_id not in self._reading:
            self.wake()
        self._more.set()
        return fut, started

    def discard(self, episode_id: str, agent: str, fut: asyncio.Future[WorkerOutcome]) -> None:
        """Forget a waiter (resolved or not); an episode without waiters leaves the read."""
        waiting = self.waiters.get(episode_id)
        if waiting is not None and waiting.get(agent) is fut:
            del waiting[agent]
            self.started.pop((episode_id, agent), None)
            if not waiting:
                del self.waiters[episode_id]
                self._forget(episode_id)

    def _forget(self, episode_id: str) -> None:
        position = self.positions.pop(episode_id, None)
        if position is not None:
            self._remembered[episode_id] = position
            while len(self._remembered) > self.remember:
                self._remembered.popitem(last=False)

    def wake(self) -> None:
        if not self._woken and self.task is not None and not self.task.done():
            self._woken = True
            self._wake_send(self.wake_stream)

    async def _loop(self) -> None:
        delay = 0.05
        while not self.closing:
            if not self.positions:
                self._more.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._more.wait(), 30.0)
                continue
            self._reading = set(self.positions)
            self._woken = False
            streams = {results_stream(e): p for e, p in self.positions.items()}
            streams[self.wake_stream] = self._wake_after
            try:
                entries = await self._source.read_many(streams, count=1000, block_ms=self.block_ms)
                self.reads += 1
                delay = 0.05
            except Exception as exc:  # the bus is down: keep trying; the worker timeout bounds the wait
                log.warning("reading %d result streams failed (%s); retrying in %.2fs", len(streams) - 1, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            for stream, entry in entries:
                if stream == self.wake_stream:
                    self._wake_after = entry.id
                    continue
                self._deliver(_episode_of(stream), entry)

    def _deliver(self, episode_id: str, entry: Any) -> None:
        if episode_id in self.positions:
            self.positions[episode_id] = entry.id
        elif episode_id in self._remembered:
            self._remembered[episode_id] = entry.id
        agent = entry.fields.get("agent", "")
        if "started" in entry.fields:  # a worker began computing it: no need to send it again
            started = self.started.get((episode_id, agent))
            if started is not None and not started.done():
                started.set_result(None)
            return
        waiting = self.waiters.get(episode_id)
        fut = waiting.pop(agent, None) if waiting is not None else None
        if fut is None or fut.done():
            return  # a duplicate, or a worker nobody waits for any more
        self.started.pop((episode_id, agent), None)
        if waiting is not None and not waiting:
            del self.waiters[episode_id]
            self._forget(episode_id)
        try:
            fut.set_result(WorkerOutcome.model_validate_json(entry.fields.get("data", "")))
        except Exception as exc:  # a malformed entry fails only its own worker
            fut.set_exception(ValueError(f"bad outcome entry {entry.id} on {results_stream(episode_id)}: {exc}"))


@dataclass
class _Copy:
    """One message sent for a task (a resend is another copy)."""

    task_id: str
    delivery_tag: str = ""
    message: str = ""  # direct dispatch: the JSON on the list
    key: str = ""  # direct dispatch: the list it was pushed onto


@dataclass
class _Dispatch:
    task: WorkerTask
    queue: str
    copies: list[_Copy]
    started: bool = False
    promoted: bool = False


class CeleryWorkerEndpoint:
    """A :class:`shared.engine.WorkerEndpoint` that runs workers as Celery tasks (see the module doc)."""

    manages_timeout = True  # the worker timeout counts from the worker's start, not from the send

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
        scheduling: str = "critical-path",
        queue_timeout_s: float | None = None,
    ) -> None:
        if scheduling not in SCHEDULING:
            raise ValueError(f"scheduling must be one of {', '.join(SCHEDULING)}, got {scheduling!r}")
        self.bus = bus
        self.app = celery_app
        self.queue_for_endpoint = dict(DEFAULT_QUEUES if queue_for_endpoint is None else queue_for_endpoint)
        self.resend_after_s = resend_after_s
        self.scheduling = scheduling
        self.queue_timeout_s = queue_timeout_s
        self.resent = 0  # tasks sent again because no worker started them in time
        self.promoted = 0  # tasks moved to the front because a join waits for them
        self.sent = 0
        self._dispatches: dict[tuple[str, str], _Dispatch] = {}
        self._layout = QueueLayout.of(celery_app)
        self._batcher: Any = None
        self._own_client: Any = None
        if self._layout is not None:
            self._batcher = self._broker_batcher(str(celery_app.conf.broker_url))
        self.reader = _ResultsReader(bus, read_block_ms, remember_episodes, self._wake)
        # without direct dispatch, sends run here, off the event loop (a broker that does not answer
        # must not stall every episode)
        self._send_pool = ThreadPoolExecutor(max_workers=send_threads, thread_name_prefix="celery-send")

    def _broker_batcher(self, broker_url: str) -> Any:
        """The bus's command batcher when the broker is the bus's Redis, else one on the broker's Redis."""
        bus_url = getattr(self.bus, "url", None)
        if bus_url and hasattr(self.bus, "batcher") and _redis_target(bus_url) == _redis_target(broker_url):
            return self.bus.batcher()
        import redis.asyncio as aioredis

        from shared.bus.redis_streams import CommandBatcher

        pool = aioredis.BlockingConnectionPool.from_url(
            broker_url, max_connections=4, timeout=10, socket_timeout=10, socket_connect_timeout=5
        )
        self._own_client = aioredis.Redis.from_pool(pool)
        return CommandBatcher(self._own_client)

    @property
    def direct(self) -> bool:
        """Whether task messages go straight onto the broker's Redis lists."""
        return self._batcher is not None

    def endpoints(self) -> dict[str | None, CeleryWorkerEndpoint]:
        """The engine's endpoint map: this endpoint for every worker kind it has a queue for."""
        return dict.fromkeys(self.queue_for_endpoint, self)

    def _wake(self, stream: str) -> None:
        """Wake the result reader: an entry on its wake stream (which expires a day after the last one)."""
        if hasattr(self.bus, "batcher"):
            batcher = self.bus.batcher()
            batcher.fire("XADD", stream, "MAXLEN", "~", "16", "*", "wake", "1")
            batcher.fire("EXPIRE", stream, "86400")
        else:
            task = asyncio.get_running_loop().create_task(self.bus.publish(stream, {"wake": "1"}, maxlen=16))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

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
        key = (task.episode_id, task.agent)
        fut, started = self.reader.register(*key)
        dispatch = _Dispatch(task, queue, [])
        self._dispatches[key] = dispatch
        loop = asyncio.get_running_loop()
        queue_timeout = self.queue_timeout_s if self.queue_timeout_s is not None else task.worker_timeout_s
        try:
            await self._send(dispatch)
            queued_until = loop.time() + queue_timeout
            wait_s = self.resend_after_s
            resend_at = loop.time() + wait_s
            while not started.done():
                left = min(resend_at, queued_until) - loop.time()
                if left > 0:
                    waits: list[asyncio.Future[Any]] = [fut, started]
                    await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                if fut.done():
                    return fut.result()
                if started.done():
                    break
                if loop.time() >= queued_until:
                    raise TimeoutError(f"worker {task.agent}: no worker started it within {queue_timeout:g}s")
                if loop.time() >= resend_at:
                    # Sent, but no worker started it: still queued behind others, or lost on its way (the
                    # Redis transport pops a message before the worker records it; a worker killed in
                    # between never had it). Send it again; a copy that finds the outcome stored
                    # republishes it.
                    log.warning(
                        "episode %s worker %s: no worker started it %.0fs after it was sent; sending it again",
                        task.episode_id, task.agent, wait_s,
                    )
                    await self._send(dispatch)
                    self.resent += 1
                    wait_s = min(wait_s * 2, 8 * self.resend_after_s)
                    resend_at = loop.time() + wait_s
            dispatch.started = True
            # a worker has it: its lease covers its death; the worker timeout runs from now
            await asyncio.wait([fut], timeout=task.worker_timeout_s)
            if not fut.done():
                raise TimeoutError(f"worker {task.agent} ran past {task.worker_timeout_s:g}s")
            return fut.result()
        except (asyncio.CancelledError, TimeoutError):
            self._take_back(dispatch)
            raise
        finally:
            self.reader.discard(task.episode_id, task.agent, fut)
            if self._dispatches.get(key) is dispatch:
                del self._dispatches[key]

    def awaited(self, task: WorkerTask) -> None:
        """The organizer now waits at ``<JOIN-i>`` for this worker: move its task to the front of its
        queue if no worker has taken it yet (critical-path scheduling; a no-op with ``fifo``)."""
        dispatch = self._dispatches.get((task.episode_id, task.agent))
        if (
            self.scheduling != "critical-path" or dispatch is None or dispatch.started or dispatch.promoted
            or self._layout is None or not dispatch.copies or dispatch.task.priority >= PRIORITY_AWAITED
        ):  # fmt: skip
            return
        dispatch.promoted = True
        dispatch.task = dispatch.task.model_copy(update={"priority": PRIORITY_AWAITED})
        copy = dispatch.copies[-1]
        message = self._message(dispatch, copy.task_id, delivery_tag=copy.delivery_tag)
        target = self._layout.key(dispatch.queue, AWAITED_PRIORITY)
        self._batcher.fire("EVAL", PROMOTE_LUA, "2", copy.key, target, copy.message, message)
        copy.message, copy.key = message, target
        self.promoted += 1

    def _message(self, dispatch: _Dispatch, task_id: str, *, delivery_tag: str | None = None) -> str:
        priority = AWAITED_PRIORITY if dispatch.promoted else FORK_PRIORITY
        task = dispatch.task
        return task_message(
            RUN_WORKER_TASK, [task.model_dump_json()], task_id=task_id, queue=dispatch.queue, priority=priority,
            delivery_tag=delivery_tag, argsrepr=f"[{task.episode_id} worker {task.agent}]",
        )  # fmt: skip

    async def _send(self, dispatch: _Dispatch) -> None:
        """Send one more copy of the task; a broker that cannot be reached is retried with jittered
        backoff until it can (the worker timeout bounds the wait). A retried send may reach the broker
        twice; the task is idempotent."""
        task = dispatch.task
        copy = _Copy(uuid.uuid4().hex, delivery_tag=str(uuid.uuid4()))
        dispatch.copies.append(copy)
        attempt = 0
        while True:
            try:
                if self._layout is not None:
                    copy.message = self._message(dispatch, copy.task_id, delivery_tag=copy.delivery_tag)
                    copy.key = self._layout.key(dispatch.queue, AWAITED_PRIORITY if dispatch.promoted else FORK_PRIORITY)
                    await (await self._batcher.call("LPUSH", copy.key, copy.message))
                else:
                    send = functools.partial(
                        self.app.send_task, RUN_WORKER_TASK, args=[task.model_dump_json()], queue=dispatch.queue,
                        task_id=copy.task_id, ignore_result=True, retry=False,
                    )  # fmt: skip
                    await asyncio.get_running_loop().run_in_executor(self._send_pool, send)
                self.sent += 1
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

    def _take_back(self, dispatch: _Dispatch) -> None:
        """Take a task nobody waits for off its queue if no worker popped it (else revoke it, best effort)."""
        for copy in dispatch.copies:
            if self._layout is not None:
                if copy.message:
                    self._batcher.fire("LREM", copy.key, "-1", copy.message, urgent=False)
            else:
                self._revoke(copy.task_id)

    def _revoke(self, task_id: str) -> None:
        def revoke() -> None:
            with contextlib.suppress(Exception):
                self.app.control.revoke(task_id)

        asyncio.get_running_loop().run_in_executor(None, revoke)

    async def close(self) -> None:
        """Fail every waiting worker and let the reader exit."""
        reader = self.reader
        reader.closing = True
        for episode_id, waiting in list(reader.waiters.items()):
            for agent, fut in list(waiting.items()):
                fut.cancel()
                reader.discard(episode_id, agent, fut)
        reader._more.set()
        if reader.task is not None and not reader.task.done():
            reader.wake()
            with contextlib.suppress(Exception):
                await asyncio.wait([reader.task], timeout=2.0)
        if reader._source is not self.bus and (reader.task is None or reader.task.done()):
            with contextlib.suppress(Exception):
                await reader._source.close()
        with contextlib.suppress(Exception):
            if hasattr(self.bus, "batcher"):
                await (await self.bus.batcher().call("DEL", reader.wake_stream))
        if self._own_client is not None:
            with contextlib.suppress(Exception):
                await self._batcher.close()
                await self._own_client.aclose()
        self._send_pool.shutdown(wait=False, cancel_futures=True)

