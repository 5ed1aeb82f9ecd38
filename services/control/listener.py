"""A serving process follows the weights stream: it loads what the trainer publishes, and says so.

:class:`WeightControlListener` tails ``<prefix>:control:weights`` (:mod:`shared.control`) on the bus:

* on start it loads the newest :class:`~shared.control.LoadWeights` already there, so a process that
  (re)starts after a swap serves the published version, not the one its configuration names;
* then, for every new entry, :func:`shared.control.apply_load` on the process's backend (a local model
  loads the checkpoint between two forward passes; a client of shared SGLang servers reads their version
  back) and a :class:`~shared.control.WeightsReply` on ``<prefix>:control:weights:replies``;
* every ``heartbeat_s`` it publishes a heartbeat reply (``request_id`` ``heartbeat``), from which the
  publisher knows which processes must answer a swap.

Episodes in flight keep running through a swap; their segments record the version of each token.
A process that fails to load keeps serving its old version and its reply says so.

Limits: a listener reads entries it missed while down only as "the newest one" (a process needs the
current version, not the history); the replies stream is capped (``CONTROL_MAXLEN``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from shared.bus.base import Bus
from shared.control import (
    LoadWeights,
    ProcessKind,
    WeightsReply,
    apply_load,
    default_prefix,
    latest_load,
    publish_model,
    weights_replies_stream,
    weights_stream,
)

log = logging.getLogger(__name__)

HEARTBEAT = "heartbeat"  # the request_id of a listener's presence reply


class WeightControlListener:
    """Keeps ``backend`` on the published version (see the module docstring)."""

    def __init__(
        self,
        bus: Bus,
        backend: Any,
        *,
        process: str,
        kind: ProcessKind = "organizer",
        prefix: str | None = None,
        block_ms: int = 500,
        heartbeat_s: float = 10.0,
    ) -> None:
        self.bus = bus
        self.backend = backend
        self.process = process
        self.kind: ProcessKind = kind
        self.prefix = prefix or default_prefix()  # ASYNCTHINK_CONTROL_PREFIX, else asyncthink
        self.block_ms = block_ms
        self.heartbeat_s = heartbeat_s
        self.replies: list[WeightsReply] = []  # what this process answered (newest last)
        self._after = "0"
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def converge(self) -> WeightsReply | None:
        """Load the newest published version if this process serves another; remember where the stream is."""
        self._after, newest = await latest_load(self.bus, self.prefix)
        if newest is None or newest.version == self.backend.weight_version:
            return None
        log.info("%s: loading the published version %s (serving %s)", self.process, newest.version,
                 self.backend.weight_version)  # fmt: skip
        return await self._apply(newest)

    async def _apply(self, message: LoadWeights) -> WeightsReply:
        reply = await apply_load(self.backend, message, process=self.process, kind=self.kind)
        self.replies.append(reply)
        if reply.ok:
            log.info("%s now serves %s (%.3fs)", self.process, reply.version, reply.seconds)
        else:
            log.error("%s could not load %s: %s; still serving %s", self.process, message.version, reply.error,
                      reply.version)  # fmt: skip
        await publish_model(self.bus, weights_replies_stream(self.prefix), reply)
        return reply

    async def _heartbeat(self) -> None:
        reply = WeightsReply(
            request_id=HEARTBEAT, process=self.process, kind=self.kind, ok=True, version=self.backend.weight_version
        )
        await publish_model(self.bus, weights_replies_stream(self.prefix), reply)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Converge, then follow the stream until ``stop`` (or :meth:`close`)."""
        stop = stop or self._stop
        loop = asyncio.get_running_loop()
        try:
            await self.converge()
        except Exception:
            log.exception("%s: loading the published version at start failed", self.process)
        next_beat = 0.0
        while not stop.is_set() and not self._stop.is_set():
            try:
                if loop.time() >= next_beat:
                    await self._heartbeat()
                    next_beat = loop.time() + self.heartbeat_s
                entries = await self.bus.read(weights_stream(self.prefix), after=self._after, count=10,
                                              block_ms=self.block_ms)  # fmt: skip
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("%s: reading the weights stream failed (%s); retrying in 1 s", self.process, exc)
                await asyncio.sleep(1.0)
                continue
            for entry in entries:
                self._after = entry.id
                try:
                    message = LoadWeights.model_validate_json(entry.fields.get("data", ""))
                except ValueError:
                    log.error("%s: skipping a malformed weights entry %s", self.process, entry.id)
                    continue
                await self._apply(message)

    def start(self) -> asyncio.Task[None]:
        """Run in the background (a task on the running loop)."""
        self._task = asyncio.create_task(self.run(), name=f"weights-listener-{self.process}")
        return self._task

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
