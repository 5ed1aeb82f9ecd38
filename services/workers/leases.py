"""Task leases: a short visibility timeout that the worker holding a task keeps renewing (a heartbeat).

Celery's Redis transport keeps every delivered, unacked message in a sorted set (``unacked_index``,
scored by delivery time) and delivers again any message older than ``visibility_timeout``. With the
timeout at an hour, a ``kill -9``'d worker stranded its tasks for an hour; with a short one and nothing
else, a live worker's long task would be delivered a second time. So the timeout here is a short lease
(``TaskLimits.lease_s``, seconds to tens of seconds) and the worker process that holds a message renews
it: :class:`LeasedRequest` (the ``Request`` class of ``asyncthink.run_worker``) registers its message's
delivery tag with this process's :class:`TaskLeases` when the message arrives (prefetched or running)
and releases it when the message is acked or rejected; a daemon thread re-scores every held tag to
"now" every third of the lease (``ZADD unacked_index XX``: a tag already acked or restored is not
re-added). A dead worker's tags stop being renewed and its tasks are delivered again about one lease
after its last heartbeat, by the next restore sweep of any live worker.

The ack of ``asyncthink.run_worker`` waits for its run (see ``acknowledge``): the task only starts the
run on the process's event loop, so the message stays unacked, held and renewed, until the outcome is out.

Limits: this relies on the key layout of kombu's Redis transport (``unacked_index`` with the transport's
``global_keyprefix``), which ``make_app`` configures; a Redis outage longer than the lease stops the
heartbeat, so tasks running through it may be delivered a second time afterwards (the done-markers of
:mod:`.tasks` make that a republish, or at worst a duplicate computation whose first outcome wins).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from celery.worker.request import Request

log = logging.getLogger(__name__)


class TaskLeases:
    """The delivery tags this process holds, and the heartbeat thread that renews them."""

    def __init__(self, redis_url: str, key: str, lease_s: float) -> None:
        import redis

        self.key = key
        self.lease_s = lease_s
        self.every_s = lease_s / 3
        self._held: dict[str, float] = {}  # delivery tag -> when it arrived
        self._lock = threading.Lock()
        timeout = max(0.5, min(5.0, self.every_s))
        self._client = redis.Redis.from_url(redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self.renewals = 0
        self._thread = threading.Thread(target=self._run, name="asyncthink-task-leases", daemon=True)
        self._thread.start()

    def hold(self, tag: str) -> None:
        """Renew ``tag`` from the next beat on (kombu scored it "now" when the message arrived)."""
        with self._lock:
            self._held[tag] = time.time()

    def release(self, tag: str) -> None:
        with self._lock:
            self._held.pop(tag, None)

    @property
    def held(self) -> list[str]:
        with self._lock:
            return list(self._held)

    def _renew(self, tags: list[str]) -> None:
        if not tags:
            return
        try:
            now = time.time()
            self._client.zadd(self.key, dict.fromkeys(tags, now), xx=True)
            self.renewals += 1
        except Exception as exc:  # Redis down: the next beat tries again; the lease may run out meanwhile
            log.warning("renewing %d task leases failed: %s", len(tags), exc)

    def _run(self) -> None:
        while True:
            time.sleep(self.every_s)
            self._renew(self.held)


_leases: TaskLeases | None = None
_leases_pid: int | None = None
_leases_lock = threading.Lock()


def leases(app: Any) -> TaskLeases:
    """This process's :class:`TaskLeases` for ``app``'s broker (made on first use, and again after a fork)."""
    global _leases, _leases_pid
    with _leases_lock:
        if _leases is None or _leases_pid != os.getpid():
            options = app.conf.broker_transport_options or {}
            key = options.get("global_keyprefix", "") + options.get("unacked_index_key", "unacked_index")
            _leases = TaskLeases(app.conf.broker_url, key, float(options["visibility_timeout"]))
            _leases_pid = os.getpid()
        return _leases


class LeasedRequest(Request):  # type: ignore[misc]
    """A task request whose message's lease is renewed from arrival until it is acked or rejected."""

    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(message, *args, **kwargs)
        self._lease_tag = getattr(message, "delivery_tag", None)
        if self._lease_tag:
            leases(self.task.app).hold(str(self._lease_tag))

    def _release_lease(self) -> None:
        if self._lease_tag:
            leases(self.task.app).release(str(self._lease_tag))

    def acknowledge(self) -> None:
        """Ack when the task's run ends: at once for a task that ran in its thread, later for a worker
        run that the task started on the process's event loop (``services.workers.tasks.InFlight``), whose
        lease is renewed until then."""
        from services.workers.tasks import in_flight

        in_flight.when_done(str(self.id), self._acknowledge_now)

    def _acknowledge_now(self) -> None:
        self._release_lease()
        super().acknowledge()

    def reject(self, requeue: bool = False) -> None:
        self._release_lease()
        super().reject(requeue=requeue)
