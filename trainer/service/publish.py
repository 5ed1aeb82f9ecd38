"""How the trainer service hands a version to the serving fleet: the :class:`WeightPublisher` interface.

``publish(LoadWeights)`` makes every serving process take the version and returns a
:class:`~shared.control.PublishReport` (each process's reply). The trainer only needs this interface;
the implementations that reach a distributed fleet (SGLang servers, Celery model workers, organizer
processes) live in ``services/control/publisher.py`` and are wired in by the command line.
:class:`LocalPublisher` swaps backends held in this process: the embedded setup (one process runs the
gateway, the organizer and the trainer) and tests.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

from shared.control import LoadWeights, PublishReport, apply_load


class WeightPublisher(Protocol):
    async def publish(self, message: LoadWeights) -> PublishReport: ...


class LocalPublisher:
    """Swaps in-process backends (``update_weights`` from the checkpoint directory), all at once."""

    def __init__(self, backends: list[Any], *, name: str = "local") -> None:
        self.backends = list(backends)
        self.name = name

    async def publish(self, message: LoadWeights) -> PublishReport:
        t0 = time.perf_counter()
        replies = await asyncio.gather(
            *(
                apply_load(b, message, process=f"{self.name}-{k}" if len(self.backends) > 1 else self.name, kind="local")
                for k, b in enumerate(self.backends)
            )
        )
        return PublishReport(
            version=message.version, path=message.path, reason=message.reason, replies=list(replies),
            seconds=time.perf_counter() - t0,
        )  # fmt: skip
