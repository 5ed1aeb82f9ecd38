"""Publishing a version to the whole serving fleet: :class:`FleetPublisher`.

One ``publish(LoadWeights)``, in this order:

1. **SGLang** (when the fleet's model is an ``sglang:`` spec): the trainer's own client swaps every replica,
   one after the other: ``/pause_generation`` (``pause_mode``), ``/update_weights_from_disk`` with the
   version label, ``/continue_generation`` (sent even when the update fails). A replica that fails stops
   the publication: the replicas already swapped are in the report, so the trainer can send them back.
2. **Everyone else at once**: the :class:`~shared.control.LoadWeights` entry on the weights stream (the
   organizers' :class:`~services.control.listener.WeightControlListener` load it, or, on SGLang, read
   the servers' version back), a Celery remote-control broadcast ``asyncthink_load_weights`` to the
   model workers (``services/workers/control.py``; each loads the checkpoint and replies), and the
   backends held in this process. Every process answers with a :class:`~shared.control.WeightsReply`.

Who must answer: the Celery workers that answer a ping just before, and the organizers that sent a
heartbeat on the replies stream within ``presence_s``; one of those that does not answer within
``timeout_s`` is listed as ``missing`` and the publication is not ``ok``.

Limits: Celery's remote control is fire-and-collect (a worker busy in a long control command answers
late and counts as missing); presence is judged by heartbeats, so an organizer that died a moment ago
can count as missing once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from shared.bus.base import Bus
from shared.control import (
    DEFAULT_PREFIX,
    LoadWeights,
    PublishReport,
    WeightsReply,
    apply_load,
    publish_model,
    wait_replies,
    weights_replies_stream,
    weights_stream,
)

log = logging.getLogger(__name__)

LOAD_COMMAND = "asyncthink_load_weights"  # the Celery remote-control command (services/workers/control.py)
VERSION_COMMAND = "asyncthink_weights"


class FleetPublisher:
    """The :class:`~trainer.service.publish.WeightPublisher` of the distributed setup."""

    def __init__(
        self,
        *,
        bus: Bus,
        celery_app: Any = None,
        sglang: Any = None,
        local: list[Any] | None = None,
        prefix: str = DEFAULT_PREFIX,
        timeout_s: float = 120.0,
        pause_mode: str = "retract",
        presence_s: float = 30.0,
    ) -> None:
        self.bus = bus
        self.celery_app = celery_app
        self.sglang = sglang
        self.local = list(local or [])
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.pause_mode = pause_mode
        self.presence_s = presence_s

    async def publish(self, message: LoadWeights) -> PublishReport:
        t0 = time.perf_counter()
        report = PublishReport(version=message.version, path=message.path, reason=message.reason)
        if self.sglang is not None:
            report.replies += await self._sglang(message)
            if not all(r.ok for r in report.replies):
                report.seconds = time.perf_counter() - t0
                return report  # its clients would not find the version; the trainer sends the others back
        organizers = await self.present_organizers()
        replies_stream = weights_replies_stream(self.prefix)
        after = await _last_id(self.bus, replies_stream)
        await publish_model(self.bus, weights_stream(self.prefix), message)
        waits: list[Any] = [
            wait_replies(self.bus, replies_stream, message.request_id, after=after,
                         expected=len(organizers) if organizers else 0, timeout_s=self.timeout_s, model=WeightsReply),
            asyncio.to_thread(self._broadcast, message),
            *(apply_load(b, message, process=f"local-{k}", kind="local") for k, b in enumerate(self.local)),
        ]  # fmt: skip
        org_replies, (celery_replies, celery_missing), *local_replies = await asyncio.gather(*waits)
        report.replies += list(org_replies) + list(celery_replies) + list(local_replies)
        answered = {r.process for r in org_replies}
        report.missing = sorted(organizers - answered) + celery_missing
        report.seconds = time.perf_counter() - t0
        return report

    async def _sglang(self, message: LoadWeights) -> list[WeightsReply]:
        from shared.backends.sglang import WeightUpdateError

        backend = self.sglang
        previous = backend.weight_version
        try:
            paused = await backend.hot_swap(message.path, weight_version=message.version, pause_mode=self.pause_mode)
        except WeightUpdateError as exc:
            out = []
            failed = False
            for url in backend.base_urls:
                if url in exc.updated:
                    out.append(_reply(message, url, "sglang", True, message.version, previous))
                elif not failed:
                    failed = True
                    out.append(_reply(message, url, "sglang", False, previous, previous, str(exc)))
                else:
                    out.append(_reply(message, url, "sglang", False, previous, previous, "not attempted"))
            return out
        except Exception as exc:  # a replica unreachable before its pause: nothing changed there
            return [_reply(message, u, "sglang", False, previous, previous, f"{type(exc).__name__}: {exc}")
                    for u in backend.base_urls]  # fmt: skip
        return [_reply(message, url, "sglang", True, message.version, previous, seconds=s) for url, s in paused.items()]

    async def present_organizers(self) -> set[str]:
        """Organizers that sent a heartbeat within ``presence_s``."""
        from services.control.listener import HEARTBEAT

        since = time.time() - self.presence_s
        names: set[str] = set()
        after = "0"
        while entries := await self.bus.read(weights_replies_stream(self.prefix), after=after, count=1000, block_ms=0):
            after = entries[-1].id
            for entry in entries:
                try:
                    reply = WeightsReply.model_validate_json(entry.fields.get("data", ""))
                except ValueError:
                    continue
                if reply.request_id == HEARTBEAT and reply.kind == "organizer" and reply.ts >= since:
                    names.add(reply.process)
        return names

    def _broadcast(self, message: LoadWeights) -> tuple[list[WeightsReply], list[str]]:
        """Celery model workers: ping, then broadcast the load; their replies and who did not answer."""
        app = self.celery_app
        if app is None:
            return [], []
        hosts = sorted({host for answer in (app.control.ping(timeout=1.0) or []) for host in answer})
        if not hosts:
            return [], []
        answers = app.control.broadcast(
            LOAD_COMMAND, arguments={"message": message.model_dump_json()}, destination=hosts, reply=True,
            timeout=self.timeout_s, limit=len(hosts),
        )  # fmt: skip
        replies: list[WeightsReply] = []
        for answer in answers or []:
            for host, body in answer.items():
                try:
                    replies.append(WeightsReply.model_validate(body))
                except ValueError:
                    replies.append(_reply(message, host, "celery", False, None, None, f"unreadable reply {body!r}"))
        answered = {r.process for r in replies}
        return replies, [h for h in hosts if h not in answered]


def _reply(
    message: LoadWeights, process: str, kind: Any, ok: bool, version: str | None, previous: str | None,
    error: str | None = None, *, seconds: float = 0.0,
) -> WeightsReply:  # fmt: skip
    return WeightsReply(request_id=message.request_id, process=process, kind=kind, ok=ok, version=version,
                        previous=previous, error=error, seconds=seconds)  # fmt: skip


async def _last_id(bus: Bus, stream: str) -> str:
    last = "0"
    while entries := await bus.read(stream, after=last, count=1000, block_ms=0):
        last = entries[-1].id
    return last


def fleet_versions(celery_app: Any, *, timeout_s: float = 2.0) -> dict[str, Any]:
    """What every Celery worker serves now (``asyncthink_weights``): hostname -> its answer."""
    answers = celery_app.control.broadcast(VERSION_COMMAND, reply=True, timeout=timeout_s) or []
    return {host: body for answer in answers for host, body in answer.items()}
