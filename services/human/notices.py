"""What the human queue says on the bus: one stream of notices, and one input stream per human organizer.

* ``QUEUE_STREAM`` (``asyncthink:human:queue``): a notice for every change of a human task (``created``,
  ``claim``, ``release``, ``lease_expired``, ``submit``, ``undo``, ``consumed``, ``deadline``, ``fallback``,
  ``cancelled``), field ``data`` = JSON ``{action, task_id, episode_id, pool, status, actor, at}``. The
  gateway's live stream forwards them to people's pages; a waiting join wakes on them. Notices are hints:
  the store holds the truth (a missed notice delays a page or a join by at most one poll).
* ``organizer_input_stream(episode_id)``: what a human organizer writes (field ``text``; ``abort`` to give
  up), read in order by :class:`services.human.organizer.HumanOrganizerBackend`.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from shared.bus.base import Bus

log = logging.getLogger(__name__)

QUEUE_STREAM = "asyncthink:human:queue"
QUEUE_MAXLEN = 10_000
INPUT_MAXLEN = 10_000


def organizer_input_stream(episode_id: str) -> str:
    return f"asyncthink:human:organizer:{episode_id}"


def recent_id(seconds: float = 2.0) -> str:
    """A stream position a little in the past (ids are ``<unix ms>-<seq>`` on both buses): a reader that
    starts there misses nothing published after it started, at the price of a few old notices."""
    return f"{max(0, int((time.time() - seconds) * 1000))}-0"


def notice(action: str, row: Any, actor: str | None = None) -> dict[str, Any]:
    return {
        "action": action,
        "task_id": row.id,
        "episode_id": row.episode_id,
        "pool": row.pool,
        "status": row.status,
        "actor": actor,
        "at": time.time(),
    }


async def publish_notice(bus: Bus, data: dict[str, Any]) -> None:
    """Publish a notice; a bus error is logged, never raised (the store already holds the change)."""
    try:
        await bus.publish(QUEUE_STREAM, {"data": json.dumps(data)}, maxlen=QUEUE_MAXLEN)
    except Exception:
        log.exception("publishing a human queue notice failed: %s", data.get("action"))
