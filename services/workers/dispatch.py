"""Celery task messages written straight onto kombu's Redis queues: cheap sends, priorities, promotion.

``app.send_task`` costs about a millisecond of CPU per task (Celery builds the message, kombu takes a
connection from its pool, declares and publishes) and blocks the caller for a round trip. An organizer
sends one task per fork, so the endpoint (:mod:`.endpoint`) builds the message itself, in the layout
Celery's message protocol 2 and kombu's Redis transport use (the same JSON ``send_task`` writes: a
base64 body ``[args, kwargs, embed]``, the task's headers, and properties with a unique
``delivery_tag``), and pushes it onto the queue's Redis list with ``LPUSH``, batched with the
organizer's other writes (:class:`~shared.bus.redis_streams.CommandBatcher`). A worker cannot tell it
from a message ``send_task`` wrote.

Priorities: kombu's Redis transport keeps one list per priority step (``model``, ``model\\x06\\x163``,
...; ``priority_steps`` and ``sep`` of the broker transport options) and a worker pops the lists in that
order, so priority 0 is served first. Forks go at :data:`FORK_PRIORITY` (3); a fork whose organizer is
already blocked at its join is *promoted*: :data:`PROMOTE_LUA` takes its message out of its list
(``LREM``, only if no worker has popped it yet) and pushes a copy marked as awaited (same task id and
delivery tag) onto the list served first, behind the other promoted ones. So when workers are scarce,
the sub-queries an organizer waits for run first, then the others in the order they were forked.
``unqueue`` (``LREM``) takes back a message no worker has started (an episode that ended without
joining it), instead of Celery's revoke broadcast.

Limits: this relies on kombu's Redis transport layout and Celery's protocol 2, like :mod:`.leases` does;
``tests/integration/faults/test_dispatch.py`` checks a real Celery worker runs such messages. Brokers
other than Redis, and apps configured with a ``global_keyprefix``, use ``send_task`` instead.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any

KOMBU_SEP = "\x06\x16"  # kombu's Redis transport: queue name + sep + priority step
KOMBU_PRIORITY_STEPS = (0, 3, 6, 9)
AWAITED_PRIORITY = 0  # served first: a fork whose join is already waiting for it
FORK_PRIORITY = 3  # every other fork, first in first out

# KEYS[1]: the list the message waits in; KEYS[2]: the list served first. ARGV[1]: the message; ARGV[2]:
# its promoted copy. Moves it only if it is still queued (a worker has not popped it); 1 if it moved.
PROMOTE_LUA = """
if redis.call('LREM', KEYS[1], -1, ARGV[1]) == 1 then
  redis.call('LPUSH', KEYS[2], ARGV[2])
  return 1
end
return 0
"""


@dataclass(frozen=True)
class QueueLayout:
    """Where kombu's Redis transport keeps a queue's messages, per priority step."""

    sep: str = KOMBU_SEP
    steps: tuple[int, ...] = KOMBU_PRIORITY_STEPS

    @classmethod
    def of(cls, app: Any) -> QueueLayout | None:
        """The layout of ``app``'s broker, or None when its messages cannot be written directly (a
        broker other than Redis, or a key prefix)."""
        conf = getattr(app, "conf", None)
        url = str(getattr(conf, "broker_url", "") or "")
        if not url.startswith(("redis://", "rediss://", "unix://")):
            return None
        options = dict(getattr(conf, "broker_transport_options", None) or {})
        if options.get("global_keyprefix"):
            return None
        return cls(sep=str(options.get("sep", KOMBU_SEP)), steps=tuple(options.get("priority_steps", KOMBU_PRIORITY_STEPS)))

    def key(self, queue: str, priority: int) -> str:
        """The list holding ``queue``'s messages of ``priority`` (kombu rounds down to a step)."""
        step = max((s for s in self.steps if s <= priority), default=self.steps[0])
        return f"{queue}{self.sep}{step}" if step else queue


_ORIGIN = f"gen{os.getpid()}@{socket.gethostname()}"
_REPLY_TO = str(uuid.uuid4())


def task_message(
    task_name: str, args: list[Any], *, task_id: str, queue: str, priority: int, delivery_tag: str | None = None,
    argsrepr: str | None = None,
) -> str:  # fmt: skip
    """The JSON of one task message as ``send_task(task_name, args=args, queue=queue, task_id=task_id,
    ignore_result=True, priority=priority)`` writes it onto kombu's Redis list."""
    body = json.dumps([args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    message = {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": task_name,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": argsrepr if argsrepr is not None else repr(args)[:1024],
            "kwargsrepr": "{}",
            "origin": _ORIGIN,
            "ignore_result": True,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": _REPLY_TO,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": priority,
            "body_encoding": "base64",
            "delivery_tag": delivery_tag or str(uuid.uuid4()),
        },
    }
    return json.dumps(message)
