"""Load the model when a Celery worker starts, not on its first task, and say so.

Connected to Celery's ``worker_ready`` signal (the app includes this module): the worker process opens
its backend (:func:`services.workers.tasks.runtime`) before it takes work, then logs
``asyncthink worker ready: ...``, the line ``asyncthink up`` waits for. Without it the first task paid
the model's load time (about 20 s on 2 CPU cores) while the worker already answered pings.

Limits: with ``--pool=prefork`` the children open their own backends on first use; the documented
command uses ``--pool=threads``, where the process that loads here is the one that runs the tasks.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from celery.signals import worker_ready

log = logging.getLogger("asyncthink.worker")


@worker_ready.connect
def load_model(sender: Any = None, **_: Any) -> None:
    if not logging.getLogger().handlers:  # Celery leaves the root logger alone (worker_hijack_root_logger)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from services.workers.tasks import runtime

    t0 = time.monotonic()
    backend = runtime().backend
    log.info(
        "asyncthink worker ready: pid %d, backend %s (weights %s) loaded in %.1fs",
        os.getpid(), backend.model_id, backend.weight_version, time.monotonic() - t0,
    )
