"""Celery tasks of the worker service: run one forked sub-query and publish its outcome.

``asyncthink.run_worker(task_json)`` takes a :class:`~shared.messages.WorkerTask` as JSON (data, never
a handle to another task; it never waits on another task's result) and, by ``task.endpoint``:

* ``None``: the model thinks about the sub-query alone — the engine's own worker loop
  (``AgentRunner(backend, task).endpoints[None]``, i.e. :class:`~shared.agents.ModelWorker`) on a
  backend opened once per worker process;
* ``"python"``, ``"verify"``: the tools of :mod:`.tools` (the ``tool`` queue);

then publishes the :class:`~shared.messages.WorkerOutcome` JSON to ``results_stream(episode_id)`` with
fields ``agent`` and ``data``. The worker's own events (its Return, its format errors) go to the
episode's event stream, as they do in the embedded setup.

Idempotency (Celery is at-least-once with ``acks_late``): the outcome is stored under a done-marker
``asyncthink:worker-done:<episode_id>:<agent>`` with ``SET NX`` (first writer wins, 1-day TTL) before
it is published. A redelivered or duplicated task finds the marker and republishes the stored outcome
instead of recomputing, so every copy on the result stream is identical and the organizer keeps the
first. Backend connection errors (``ConnectionError``, ``TimeoutError``, ``OSError``) are retried with
exponential backoff; once retries run out, or on any other error, an error outcome is published so
the organizer's Join resumes instead of waiting for its timeout.

Backend: :func:`services.runtime.open_service_backend` (the configured model; tests and benchmarks
inject the scripted backend through ``ASYNCTHINK_BACKEND_FACTORY``), opened once per process.

Limits: two copies of one task running at the same moment both compute (the marker decides which
outcome is kept and published by both); a worker that forks (recursive organization) runs its own
children in this process rather than through the queue; ``echo`` exists only as the benchmark's
yardstick.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from services.runtime import BusSink, open_service_backend
from services.workers.app import app
from services.workers.tools import TOOL_NAMES, run_tool
from shared.agents import AgentRunner, failed_outcome
from shared.backends.base import ModelBackend
from shared.config import Settings, get_settings
from shared.messages import WorkerOutcome, WorkerTask, results_stream

log = logging.getLogger(__name__)

T = TypeVar("T")

DONE_TTL_S = 24 * 3600  # how long a done-marker (and so idempotency) lasts
RESULTS_MAXLEN = 10_000  # approximate cap on one episode's result stream
MAX_RETRIES = 5  # backend connection errors retried with backoff 1, 2, 4, 8, 16 s (jittered)
RETRYABLE: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, OSError)


def done_key(episode_id: str, agent: str) -> str:
    return f"asyncthink:worker-done:{episode_id}:{agent}"


class WorkerRuntime:
    """Per-process state: an asyncio loop in a daemon thread, the backend, the bus and a Redis client.

    Celery runs tasks in threads (``--pool=threads``) or forked processes; each task hands its
    coroutine to this loop with :meth:`call`, so the async backend and bus are opened once per process
    and shared by every concurrent task.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="asyncthink-worker-loop", daemon=True)
        self._thread.start()
        self._backend: ModelBackend | None = None
        self._backend_lock = threading.Lock()
        self.bus, self.redis = self.call(self._connect())

    async def _connect(self) -> tuple[Any, Any]:
        import redis.asyncio as aioredis

        from shared.bus.redis_streams import RedisStreamsBus

        url = self.settings.redis_url
        client = aioredis.Redis.from_url(url, decode_responses=True, socket_timeout=10, socket_connect_timeout=5)
        return RedisStreamsBus(url), client

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def backend(self) -> ModelBackend:
        with self._backend_lock:
            if self._backend is None:
                self._backend = open_service_backend(self.settings)
                log.info("worker process %d opened backend %s", os.getpid(), self._backend.model_id)
            return self._backend


_runtime: WorkerRuntime | None = None
_runtime_pid: int | None = None
_runtime_lock = threading.Lock()


def runtime() -> WorkerRuntime:
    """This process's runtime (made on first use, and again after a fork)."""
    global _runtime, _runtime_pid
    with _runtime_lock:
        if _runtime is None or _runtime_pid != os.getpid():
            _runtime = WorkerRuntime(get_settings())
            _runtime_pid = os.getpid()
        return _runtime


async def compute(rt: WorkerRuntime, task: WorkerTask, sink: BusSink | None = None) -> WorkerOutcome:
    """Run the sub-query (no idempotency here): the model, a tool, or an unknown-endpoint error.

    The worker's live events go through ``sink`` (background publishing: an event's XADD never sits
    between the worker's last token and its outcome); the caller drains it after the outcome is out.
    """
    if task.endpoint is None:
        from shared.tasks import get_task

        runner = AgentRunner(rt.backend, get_task(task.task), sink=sink or BusSink(rt.bus))
        return await runner.endpoints[None].run(task)
    if task.endpoint in TOOL_NAMES:
        return run_tool(task)
    return failed_outcome(task, f"unknown endpoint {task.endpoint!r}")


async def finish(rt: WorkerRuntime, task: WorkerTask, outcome: WorkerOutcome | None) -> str:
    """Store ``outcome`` under the done-marker unless one is there; publish the stored one. Returns it."""
    key = done_key(task.episode_id, task.agent)
    stored: str | None = None
    if outcome is not None:
        data = outcome.model_dump_json()
        previous = await rt.redis.set(key, data, nx=True, ex=DONE_TTL_S, get=True)
        stored = previous or data
    else:
        stored = await rt.redis.get(key)
        if stored is None:
            raise LookupError(f"no done-marker for {key}")
    await rt.bus.publish(
        results_stream(task.episode_id), {"agent": task.agent, "data": stored}, maxlen=RESULTS_MAXLEN
    )
    return stored


async def run_once(rt: WorkerRuntime, task: WorkerTask, *, final_attempt: bool) -> None:
    """The idempotent body: republish a stored outcome, or compute, store and publish a new one."""
    if await rt.redis.exists(done_key(task.episode_id, task.agent)):
        log.info("episode %s worker %s: already done, republishing", task.episode_id, task.agent)
        await finish(rt, task, None)
        return
    sink = BusSink(rt.bus, background=True)
    try:
        outcome = await compute(rt, task, sink)
    except RETRYABLE as exc:
        if not final_attempt:
            raise
        log.error("episode %s worker %s: backend unreachable after retries: %s", task.episode_id, task.agent, exc)
        outcome = failed_outcome(task, f"backend unreachable: {exc}")
    except Exception as exc:
        log.exception("episode %s worker %s failed", task.episode_id, task.agent)
        outcome = failed_outcome(task, f"{type(exc).__name__}: {exc}")
    await finish(rt, task, outcome)
    await sink.drain()


@app.task(name="asyncthink.run_worker", bind=True, acks_late=True, ignore_result=True, max_retries=MAX_RETRIES)
def run_worker(self: Any, task_json: str) -> None:
    """Run one forked sub-query (model or tool) and publish its outcome to the episode's result stream."""
    task = WorkerTask.model_validate_json(task_json)
    rt = runtime()
    retries = int(self.request.retries or 0)
    try:
        if task.endpoint is None:
            _ = rt.backend  # open it here, not on the shared loop (loading a model blocks)
        rt.call(run_once(rt, task, final_attempt=retries >= MAX_RETRIES))
    except RETRYABLE as exc:
        countdown = min(2**retries, 60)
        log.warning("episode %s worker %s: %s; retry %d in %ds", task.episode_id, task.agent, exc, retries + 1, countdown)
        raise self.retry(exc=exc, countdown=countdown) from exc


@app.task(name="asyncthink.echo", ignore_result=False)
def echo(x: Any) -> Any:
    """Return the argument (the benchmark's bare Celery round trip)."""
    return x
