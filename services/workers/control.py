"""Remote-control commands of the Celery model workers: take a published version, say which one serves.

Registered with Celery's remote control when the app imports this module (``include`` in
:mod:`services.workers.app`):

* ``asyncthink_load_weights(message)``: ``message`` is a :class:`~shared.control.LoadWeights` as JSON. The
  worker process loads the checkpoint into its backend (:func:`shared.control.apply_load`: the content
  hash is checked first; an SGLang client only reads the servers' version back) on its runtime's event
  loop, so tasks in flight keep running and their segments record each token's version; it replies
  with a :class:`~shared.control.WeightsReply`. A worker that fails to load keeps serving its old
  version and says so (``ok: false``, ``error``, ``version``). Sent by
  :class:`services.control.publisher.FleetPublisher` as a broadcast.
* ``asyncthink_weights()``: ``{"version", "model_id", "pid"}`` of the worker's backend.

And when a worker starts (``worker_ready``), after the model is loaded, it loads the newest version on
the weights stream (Redis), so a worker that (re)starts after a swap serves the published version.

Limits: a control command runs in the worker's consumer thread, so the worker takes no new task while it
loads (tasks already running go on); the reply must come within the broadcaster's timeout.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery.signals import worker_ready
from celery.worker.control import control_command, inspect_command

from shared.control import LoadWeights, apply_load

log = logging.getLogger("asyncthink.worker")

LOAD_TIMEOUT_S = 600.0


@control_command(args=[("message", str)], signature="<LoadWeights JSON>")
def asyncthink_load_weights(state: Any, message: str, **_: Any) -> dict[str, Any]:
    """Load a published version into this worker's backend and reply with the outcome."""
    from services.workers.tasks import runtime

    load = LoadWeights.model_validate_json(message)
    rt = runtime()
    backend = rt.backend
    reply = rt.call(apply_load(backend, load, process=str(state.hostname), kind="celery"), timeout=LOAD_TIMEOUT_S)
    if reply.ok:
        log.info("worker %s now serves %s (%.3fs)", state.hostname, reply.version, reply.seconds)
    else:
        log.error("worker %s could not load %s: %s; still serving %s", state.hostname, load.version, reply.error,
                  reply.version)  # fmt: skip
    return reply.model_dump(mode="json")


@inspect_command()
def asyncthink_weights(state: Any, **_: Any) -> dict[str, Any]:
    """The version this worker's backend serves."""
    from services.workers.tasks import runtime

    backend = runtime().backend
    return {"version": backend.weight_version, "model_id": backend.model_id, "pid": os.getpid()}


@worker_ready.connect
def load_published(sender: Any = None, **_: Any) -> None:
    """At start: serve the newest published version, if the weights stream has one."""
    from services.workers.tasks import runtime
    from shared.control import default_prefix, latest_load

    rt = runtime()
    backend = rt.backend
    try:
        _after, newest = rt.call(latest_load(rt.bus, default_prefix()), timeout=30)
    except Exception as exc:
        log.warning("could not read the weights stream at start (%s); serving %s", exc, backend.weight_version)
        return
    if newest is None or newest.version == backend.weight_version:
        return
    hostname = getattr(sender, "hostname", None) or f"pid-{os.getpid()}"
    reply = rt.call(apply_load(backend, newest, process=str(hostname), kind="celery"), timeout=LOAD_TIMEOUT_S)
    log.info("worker %s at start: %s", hostname,
             f"loaded the published version {reply.version}" if reply.ok else f"could not load {newest.version}: {reply.error}")  # fmt: skip
