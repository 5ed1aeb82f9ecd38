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

Limits: the Redis transport redelivers an unacked task after ``visibility_timeout`` (1 h here), so a
worker must finish a sub-query well within it.
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from shared.config import get_settings

QUEUES = ("model", "tool", "human")  # one per worker kind; "human" is reserved for the web queue
VISIBILITY_TIMEOUT_S = 3600  # a task unacked this long is delivered again (Redis transport)


def make_app(redis_url: str | None = None) -> Celery:
    """A configured Celery app for ``redis_url`` (default ``Settings.redis_url``)."""
    url = redis_url or get_settings().redis_url
    app = Celery("asyncthink", broker=url, backend=url, include=["services.workers.tasks"])
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
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        timezone="UTC",
    )
    return app


app = make_app()
