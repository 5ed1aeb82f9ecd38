"""The Celery application of the worker service: broker, result backend and queues.

Start a worker with::

    celery -A services.workers.app worker -Q model,tool --pool=threads -c 4

Broker and result backend are ``Settings.redis_url``. Queues are declared explicitly, one per worker
kind: ``model`` (a forked sub-query thought about by the model), ``tool`` (``<FORK-i@python>``, ``<FORK-i@verify>``) and
``human`` (reserved for the web queue); ``task_create_missing_queues`` is off, so a typo in a queue
name fails loudly instead of creating a queue nobody consumes.

Delivery: ``task_acks_late`` + ``task_reject_on_worker_lost`` + ``worker_prefetch_multiplier=1``, so
a task whose worker dies is delivered again; tasks are therefore idempotent (:mod:`.tasks`). JSON
only. Task results are not stored (outcomes go to the episode's result stream), except for
``asyncthink.echo``, the benchmark's yardstick.

Time limits and redelivery derive from ``Settings.worker_timeout_s`` (:func:`task_limits`): a task's
computation is cut off after the worker timeout (the organizer has given up on it by then), Celery's
soft and hard time limits (enforced by the prefork pool; the threads pool relies on the task's own
cut-off) follow it, and the Redis transport's visibility timeout is a short lease
(``Settings.task_lease_s``, default a tenth of the worker timeout between 5 and 30 s) that the worker
holding a task renews (:mod:`.leases`). So a ``kill -9``'d worker's tasks are delivered again about one
lease after its last heartbeat (restore sweeps run every half lease), and a live worker's long task is
never delivered twice.

Limits: a Redis outage longer than the lease stops the heartbeats, so tasks running through it may be
delivered again afterwards (a republish of the stored outcome, or a duplicate computation whose first
outcome wins).
"""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from kombu import Exchange, Queue

from shared.config import Settings, get_settings

QUEUES = ("model", "tool", "human")  # one per worker kind; "human" is reserved for the web queue
REDIS_RETRY_S = 60.0  # how long a task retries one Redis write in process (a short outage; see .tasks)


@dataclass(frozen=True)
class TaskLimits:
    """The time bounds of a worker task, all derived from the worker timeout (see the module doc)."""

    worker_timeout_s: float  # the computation is cut off after this (the organizer stops waiting then)
    lease_s: float  # visibility timeout: a task is delivered again this long after its last heartbeat

    @property
    def soft_s(self) -> float:
        """Celery's soft time limit: the computation's cut-off plus a little."""
        return self.worker_timeout_s + 5.0

    @property
    def hard_s(self) -> float:
        """Celery's hard time limit: room for the cut-off, then for the outcome's writes through an outage."""
        return self.worker_timeout_s + REDIS_RETRY_S + 30.0


def task_limits(settings: Settings) -> TaskLimits:
    lease = settings.task_lease_s or min(30.0, max(5.0, settings.worker_timeout_s / 10))
    return TaskLimits(worker_timeout_s=settings.worker_timeout_s, lease_s=lease)


# the task module, the worker's start-up model load, and the trainer's weight-swap control command
TASK_MODULES = ["services.workers.tasks", "services.workers.warmup", "services.workers.control"]


def make_app(redis_url: str | None = None, settings: Settings | None = None) -> Celery:
    """A configured Celery app for ``redis_url`` (default ``Settings.redis_url``)."""
    settings = settings or get_settings()
    url = redis_url or settings.redis_url
    limits = task_limits(settings)
    app = Celery("asyncthink", broker=url, backend=url, include=TASK_MODULES)
    app.conf.update(
        task_queues=tuple(Queue(q, Exchange(q, type="direct"), routing_key=q) for q in QUEUES),
        task_default_queue="model",
        task_default_exchange="model",
        task_default_routing_key="model",
        task_create_missing_queues=False,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_expires=3600,
        task_soft_time_limit=limits.soft_s,
        task_time_limit=limits.hard_s,
        broker_transport_options={
            "visibility_timeout": limits.lease_s,
            "unacked_restore_interval": max(1, round(limits.lease_s / 2)),  # restore sweeps every half lease
            "unacked_restore_throttle": 1,  # ... each one a real scan
            "unacked_mutex_expire": max(5, round(limits.lease_s)),  # a sweeper killed mid-sweep blocks no one long
            "socket_timeout": 10,
            "socket_connect_timeout": 5,
        },
        result_backend_transport_options={"socket_timeout": 10, "socket_connect_timeout": 5},
        # Running tasks carry on through a broker reconnect: their outcomes go out through their own
        # retries; an ack lost with the old connection means one more delivery (a republish).
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        timezone="UTC",
    )
    return app


app = make_app()
