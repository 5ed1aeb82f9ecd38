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

Idempotency (Celery is at-least-once with ``acks_late``, and the organizer sends a task again when no
worker started it): the outcome is stored under a done-marker ``asyncthink:worker-done:<episode_id>:<agent>``
with ``SET NX`` (first writer wins, 1-day TTL) before it is published. A redelivered or duplicated task
finds the marker and republishes the stored outcome instead of recomputing, so every copy on the result
stream is identical and the organizer keeps the first. A copy that arrives while another is computing
finds that copy's claim (``asyncthink:worker-claim:...``, a short TTL its process renews) and waits for
the outcome instead of computing it twice; a claim whose holder died lapses within a lease. The copy that
computes first publishes a ``started`` notice on the result stream. Every Redis call of a task (the done-marker check, the marker write and the outcome's publish in
:func:`finish`) is retried in process through a short outage: the Redis client's own
``ConnectionError``/``TimeoutError`` and the bus's ``BusConnectionError``, with jittered exponential
backoff for up to ``REDIS_RETRY_S`` (:func:`shared.retry.retry_async`), so a computed outcome is not
lost to a 5-10 s cut. Backend connection errors (Python's ``ConnectionError``, ``TimeoutError``,
``OSError``) and Redis errors that outlast that budget are retried by Celery with exponential backoff;
once retries run out, or on any other error, an error outcome is published so the organizer's Join
resumes instead of waiting for its timeout.

Bounds: the computation is cut off at the worker timeout (``Settings.worker_timeout_s``, see
:func:`services.workers.app.task_limits`) and a "timeout" outcome is stored and published instead, so a
task never runs unbounded whatever the pool; the task's message is leased (:mod:`.leases`): renewed while
this process holds it, delivered again soon after this process dies.

Backend: :func:`services.runtime.open_service_backend` (the configured model; tests and benchmarks
inject the scripted backend through ``ASYNCTHINK_BACKEND_FACTORY``), opened once per process.

Limits: two copies of one task compute twice only when the first one's claim lapsed (its process
stalled, or Redis was unreachable, for longer than a lease); the done-marker still decides which outcome
is kept and published by both. A worker that forks (recursive organization) runs its own
children in this process rather than through the queue; ``echo`` exists only as the benchmark's
yardstick.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

from celery.signals import worker_shutting_down

from services.runtime import EVENTS_MAXLEN, BusSink, open_service_backend
from services.workers.app import REDIS_RETRY_S, app, task_limits
from services.workers.tools import TOOL_NAMES, run_tool
from shared.agents import AgentRunner, EventSink, ListSink, failed_outcome
from shared.backends.base import ModelBackend
from shared.config import Settings, get_settings
from shared.messages import (
    EpisodeEvent,
    WorkerOutcome,
    WorkerTask,
    claim_key,
    done_key,
    events_stream,
    results_stream,
)
from shared.retry import REDIS_ERRORS, retry_async

log = logging.getLogger(__name__)

T = TypeVar("T")

DONE_TTL_S = 24 * 3600  # how long a done-marker (and so idempotency) lasts
RESULTS_MAXLEN = 2 * 131_072  # approximate cap on one episode's result stream (two entries per fork: never reached)
MAX_RETRIES = 5  # backend connection errors retried with backoff 1, 2, 4, 8, 16 s (jittered)
# Python's connection errors (a backend's HTTP client) and the Redis client's own, which are not
# subclasses of them (a Celery-level retry after the in-process Redis retries below ran out).
RETRYABLE: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, OSError, *REDIS_ERRORS)


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
        self.claim_ttl_s = task_limits(settings).lease_s
        self.claims: dict[str, str] = {}  # claim key -> the token this process holds it with
        self.bus, self.redis = self.call(self._connect())
        self.claim_script = self.redis.register_script(_CLAIM_LUA)
        self.finish_script = self.redis.register_script(_FINISH_LUA)
        self._renewer = asyncio.run_coroutine_threadsafe(self._renew_claims_forever(), self.loop)

    async def _connect(self) -> tuple[Any, Any]:
        import redis.asyncio as aioredis

        from shared.bus.redis_streams import RedisStreamsBus

        url = self.settings.redis_url
        client = aioredis.Redis.from_url(url, decode_responses=True, socket_timeout=10, socket_connect_timeout=5)
        return RedisStreamsBus(url), client

    async def _renew_claims_forever(self) -> None:
        """Every third of the claim TTL, extend the claims this process holds (a heartbeat)."""
        while True:
            await asyncio.sleep(self.claim_ttl_s / 3)
            for key in list(self.claims):
                try:
                    await self.redis.expire(key, max(1, round(self.claim_ttl_s)))
                except Exception as exc:  # Redis down: the claim may lapse; a second copy then computes too
                    log.warning("renewing claim %s failed: %s", key, exc)
                    break

    def close(self) -> None:
        """Stop the heartbeat, close the clients and stop the loop (tests; a worker process just exits)."""
        self._renewer.cancel()

        async def close_clients() -> None:
            await self.bus.close()
            await self.redis.aclose()

        with contextlib.suppress(Exception):
            self.call(close_clients(), timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)

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


async def compute(rt: WorkerRuntime, task: WorkerTask, sink: EventSink | None = None) -> WorkerOutcome:
    """Run the sub-query (no idempotency here): the model, a tool, or an unknown-endpoint error.

    The worker's live events go to ``sink`` (by default a list that :func:`finish` publishes with the
    outcome, in one round trip); a sink that publishes at once can be given instead.
    """
    if task.endpoint is None:
        from shared.tasks import get_task
        from shared.tasks.prompts import for_model

        prompted = for_model(get_task(task.task), rt.backend, task.capacity)
        runner = AgentRunner(rt.backend, prompted, sink=sink or BusSink(rt.bus))
        return await runner.endpoints[None].run(task)
    if task.endpoint in TOOL_NAMES:
        return run_tool(task)
    return failed_outcome(task, f"unknown endpoint {task.endpoint!r}")


def _redis(rt: WorkerRuntime, task: WorkerTask, what: str, fn: Any) -> Any:
    """``fn()`` retried on Redis errors for ``REDIS_RETRY_S`` (jittered backoff), logged per episode."""
    return retry_async(f"episode {task.episode_id} worker {task.agent}: {what}", fn, budget_s=REDIS_RETRY_S, logger=log)


# KEYS: done-marker, result stream, claim, event stream. ARGV: the outcome ("" to republish the stored
# one), done TTL, agent, result stream maxlen, claim token, event stream maxlen, stream TTL, then the
# worker's events (JSON). Stores the outcome unless one is stored (first writer wins), publishes this
# copy's events only if its outcome is the one stored, publishes the stored outcome, gives the streams a
# TTL if they have none (so a stream a late worker recreates never lives forever), releases the claim if
# this copy holds it, and returns the stored outcome (false: nothing stored to republish).
_FINISH_LUA = """
local stored
local fresh = false
if ARGV[1] == '' then
  stored = redis.call('GET', KEYS[1])
  if not stored then return false end
else
  local prev = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'GET', 'EX', tonumber(ARGV[2]))
  if prev then stored = prev else stored = ARGV[1]; fresh = true end
end
if fresh then
  for i = 8, #ARGV do
    redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[6], '*', 'data', ARGV[i])
  end
  if #ARGV >= 8 then redis.call('EXPIRE', KEYS[4], tonumber(ARGV[7]), 'NX') end
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'agent', ARGV[3], 'data', stored)
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[7]), 'NX')
if ARGV[5] ~= '' and redis.call('GET', KEYS[3]) == ARGV[5] then redis.call('DEL', KEYS[3]) end
return stored
"""


async def finish(
    rt: WorkerRuntime,
    task: WorkerTask,
    outcome: WorkerOutcome | None,
    *,
    events: list[EpisodeEvent] | None = None,
    token: str = "",
) -> str:
    """Store ``outcome`` under the done-marker unless one is there; publish the stored one (and, when
    this copy's outcome is the one stored, its ``events`` first); release this copy's claim. Returns
    the stored outcome. ``outcome=None`` republishes the stored one (LookupError without one).

    One round trip (:data:`_FINISH_LUA`), retried through a short Redis outage: it is idempotent
    (``SET NX GET`` keeps the outcome stored first, and the organizer drops a repeated outcome)."""
    keys = [
        done_key(task.episode_id, task.agent), results_stream(task.episode_id),
        claim_key(task.episode_id, task.agent), events_stream(task.episode_id),
    ]  # fmt: skip
    args = [
        outcome.model_dump_json() if outcome is not None else "", DONE_TTL_S, task.agent, RESULTS_MAXLEN, token,
        EVENTS_MAXLEN, DONE_TTL_S, *(e.model_dump_json() for e in events or ()),
    ]  # fmt: skip
    stored = await _redis(rt, task, "storing and publishing the outcome", lambda: rt.finish_script(keys=keys, args=args))
    if stored is None:
        raise LookupError(f"no done-marker for {keys[0]}")
    if token:
        rt.claims.pop(keys[2], None)
    return str(stored)


# KEYS: done-marker, claim, result stream; ARGV: token, claim TTL (s), agent, stream maxlen.
# "done" if the outcome is stored; "claimed" (and the started notice published) if the claim was free;
# else "busy": another copy holds it. One round trip for what a task checks before computing.
_CLAIM_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 'done' end
if redis.call('GET', KEYS[2]) == ARGV[1] then return 'claimed' end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'EX', tonumber(ARGV[2])) then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'agent', ARGV[3], 'started', ARGV[1])
  return 'claimed'
end
return 'busy'
"""


async def _claim(rt: WorkerRuntime, task: WorkerTask, token: str) -> bool:
    """Become the one copy of this task that computes it: True once claimed (its ``started`` notice is
    then on the result stream); False when the outcome is stored (waiting while a live copy holds the
    claim, bounded by the cutoff)."""
    done, claim = done_key(task.episode_id, task.agent), claim_key(task.episode_id, task.agent)
    keys = [done, claim, results_stream(task.episode_id)]
    args = [token, max(1, round(rt.claim_ttl_s)), task.agent, RESULTS_MAXLEN]
    deadline = time.monotonic() + task_limits(rt.settings).worker_timeout_s
    waited = False
    while True:
        state = await _redis(rt, task, "claiming the task", lambda: rt.claim_script(keys=keys, args=args))
        if state == "done":
            return False
        if state == "claimed":
            rt.claims[claim] = token
            return True
        if time.monotonic() > deadline:  # the holder renews but never finishes: compute anyway
            log.error("episode %s worker %s: its claim was held past the worker timeout", task.episode_id, task.agent)
            rt.claims[claim] = token
            return True
        if not waited:
            log.info("episode %s worker %s: another copy is computing it; waiting for its outcome", task.episode_id, task.agent)
            waited = True
        await asyncio.sleep(0.25)


async def run_once(rt: WorkerRuntime, task: WorkerTask, *, final_attempt: bool, token: str | None = None) -> None:
    """The idempotent body: republish a stored outcome, or compute, store and publish a new one.

    At most one copy computes at a time (the claim); a copy that finds another computing waits for its
    outcome and republishes it. Before computing, a ``started`` notice goes to the result stream, so the
    organizer knows the task reached a worker (it sends a task again only when none started it)."""
    token = token or uuid.uuid4().hex
    if not await _claim(rt, task, token):
        log.info("episode %s worker %s: already done, republishing", task.episode_id, task.agent)
        await finish(rt, task, None)
        return
    try:
        await _compute_and_finish(rt, task, final_attempt=final_attempt, token=token)
    finally:
        claim = claim_key(task.episode_id, task.agent)
        if rt.claims.pop(claim, None) is not None:
            with contextlib.suppress(Exception):  # it expires by itself
                await rt.redis.delete(claim)


async def _compute_and_finish(rt: WorkerRuntime, task: WorkerTask, *, final_attempt: bool, token: str = "") -> None:
    sink = ListSink()  # the worker's events go out with its outcome, in one round trip
    started = time.monotonic()
    cutoff = task_limits(rt.settings).worker_timeout_s
    deadline = asyncio.timeout(cutoff)
    try:
        async with deadline:
            outcome = await compute(rt, task, sink)
    except RETRYABLE as exc:
        if isinstance(exc, TimeoutError) and deadline.expired():
            log.error("episode %s worker %s: cut off at the worker timeout (%gs)", task.episode_id, task.agent, cutoff)
            outcome = failed_outcome(task, "timeout", returned=f"[worker {task.fork_id} timed out after {cutoff:g}s]")
        elif not final_attempt:
            raise
        else:
            log.error("episode %s worker %s: backend unreachable after retries: %s", task.episode_id, task.agent, exc)
            outcome = failed_outcome(task, f"backend unreachable: {exc}")
    except Exception as exc:
        log.exception("episode %s worker %s failed", task.episode_id, task.agent)
        outcome = failed_outcome(task, f"{type(exc).__name__}: {exc}")
    await finish(rt, task, outcome, events=sink.events, token=token)
    log.info(
        "episode %s worker %s (%s): %s, %d tokens in %.2fs",
        task.episode_id, task.agent, task.endpoint or "model", outcome.error or "returned",
        sum(seg.generated_tokens for seg in outcome.segments), time.monotonic() - started,
    )


async def run_task(rt: WorkerRuntime, task: WorkerTask, *, token: str) -> None:
    """:func:`run_once`, with backend connection errors retried in process (backoff 1, 2, 4, 8, 16 s,
    jittered); the last attempt publishes an error outcome instead of raising."""
    for attempt in range(MAX_RETRIES + 1):
        try:
            await run_once(rt, task, final_attempt=attempt >= MAX_RETRIES, token=token)
            return
        except RETRYABLE as exc:
            delay = min(2**attempt, 60) * (0.5 + random.random() / 2)
            log.warning(
                "episode %s worker %s: %s; retry %d in %.1fs", task.episode_id, task.agent, exc, attempt + 1, delay
            )
            await asyncio.sleep(delay)


class InFlight:
    """The worker runs this process has started and not finished, by Celery task id: their messages are
    acked when they finish (:class:`~services.workers.leases.LeasedRequest`), not when the task returns.

    So a Celery thread only starts a run on the process's event loop and returns: a process holds as
    many runs in flight as its prefetch allows (``-c`` x ``--prefetch-multiplier`` unacked messages),
    not one per thread, and each run's message stays leased (and redelivered if this process dies)
    until its outcome is published. Acks go through one thread of their own, in the order runs end.
    """

    def __init__(self) -> None:
        self._runs: dict[str, concurrent.futures.Future[None]] = {}
        self._lock = threading.Lock()
        self._acker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="asyncthink-ack")

    def add(self, task_id: str, run: concurrent.futures.Future[None]) -> None:
        with self._lock:
            self._runs[task_id] = run
        run.add_done_callback(lambda _f: self._discard(task_id, run))

    def _discard(self, task_id: str, run: concurrent.futures.Future[None]) -> None:
        with self._lock:
            if self._runs.get(task_id) is run:
                del self._runs[task_id]

    def when_done(self, task_id: str, ack: Any) -> None:
        """Call ``ack`` (from the ack thread) once the run of ``task_id`` ends; at once if none runs."""
        with self._lock:
            run = self._runs.get(task_id)
        if run is None or run.done():
            ack()
            return
        run.add_done_callback(lambda _f: self._acker.submit(ack))

    def __len__(self) -> int:
        with self._lock:
            return len(self._runs)

    def wait(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for the runs in flight; returns how many are still running."""
        with self._lock:
            runs = list(self._runs.values())
        concurrent.futures.wait(runs, timeout=timeout_s)
        self._acker.shutdown(wait=True)
        self._acker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="asyncthink-ack")
        return sum(not r.done() for r in runs)


in_flight = InFlight()


@app.task(
    name="asyncthink.run_worker",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
    max_retries=MAX_RETRIES,
    Request="services.workers.leases:LeasedRequest",
)
def run_worker(self: Any, task_json: str) -> None:
    """Start one forked sub-query (model or tool) on the process's event loop; its outcome goes to the
    episode's result stream, and its message is acked when it has (see :class:`InFlight`)."""
    task = WorkerTask.model_validate_json(task_json)
    rt = runtime()
    if task.endpoint is None:
        _ = rt.backend  # open it here, not on the shared loop (loading a model blocks)
    task_id = str(self.request.id or uuid.uuid4().hex)
    run = asyncio.run_coroutine_threadsafe(run_task(rt, task, token=task_id), rt.loop)
    in_flight.add(task_id, run)


@worker_shutting_down.connect
def _finish_in_flight(**_: Any) -> None:
    """A warm shutdown lets the runs in flight finish (and be acked) for up to the grace period, before
    Celery closes the broker connection (which puts unacked messages back on their queues)."""
    if not len(in_flight):
        return
    grace = float(os.environ.get("ASYNCTHINK_WORKER_SHUTDOWN_GRACE_S", "30"))
    log.info("shutting down: waiting up to %.0fs for %d worker runs in flight", grace, len(in_flight))
    left = in_flight.wait(grace)
    if left:
        log.warning("%d worker runs still in flight at shutdown: their tasks run again elsewhere", left)


@app.task(name="asyncthink.echo", ignore_result=False)
def echo(x: Any) -> Any:
    """Return the argument (the benchmark's bare Celery round trip)."""
    return x
