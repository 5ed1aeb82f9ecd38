"""``/healthz`` (the process answers), ``/readyz`` (database and bus reachable) and ``/metrics``.

``/metrics`` refreshes the scaling gauges first (docs/scaling.md): episodes queued and in flight on the
problems stream, and the depth of each Celery queue (Redis only; a failed look leaves the last values).

``/readyz`` probes each dependency with a timeout (``probe_timeout_s``): the database with
``SELECT 1`` through the gateway's session factory, the bus with ``ping()`` where the bus has one
(Redis) or an empty non-blocking read otherwise. The 503 body names each failed dependency and the kind
of error (``OperationalError``, ``timed out after 5s``); the error itself, which may hold a host, a URL or
SQL, is logged, never sent: ``/readyz`` answers without a key.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import text

from services.gateway.auth import AdminKey
from services.gateway.deps import MetricsDep, StateDep
from services.gateway.metrics import CONTENT_TYPE_LATEST
from services.gateway.state import GatewayState

log = logging.getLogger(__name__)

router = APIRouter(tags=["operations"])

READY_PROBE_STREAM = "asyncthink:gateway:readyz"
WORKER_QUEUES = ("model", "tool", "human")


async def refresh_scaling_gauges(state: GatewayState) -> None:
    """Set the gauges an autoscaler reads; a failure is logged and the last values stay."""
    from services.gateway.submission import backlog
    from services.workers.dispatch import QueueLayout

    try:
        await backlog(state, fresh=True)
        lengths = getattr(state.bus, "list_lengths", None)
        if lengths is not None:
            layout = QueueLayout()
            for queue in WORKER_QUEUES:
                keys = [layout.key(queue, step) for step in layout.steps]
                state.metrics.worker_queue_depth.labels(queue).set(sum(await lengths(keys)))
    except Exception as exc:
        log.warning("refreshing the scaling gauges failed: %s", exc)


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str  # "ready" or "unavailable"
    checks: dict[str, str]  # dependency -> "ok" or the error
    failed: list[str]  # the dependencies that failed


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
async def healthz() -> Health:
    return Health(status="ok")


def _db_probe(state: GatewayState) -> None:
    with state.session_factory() as session:
        session.execute(text("SELECT 1"))


async def _bus_probe(state: GatewayState) -> None:
    ping = getattr(state.bus, "ping", None)
    if callable(ping):
        await ping()
    else:
        await state.bus.read(READY_PROBE_STREAM, after="0", count=1, block_ms=0)


async def _check(name: str, probe: Callable[[], Awaitable[Any]], timeout_s: float) -> str:
    try:
        await asyncio.wait_for(probe(), timeout_s)
    except TimeoutError:
        log.warning("readiness: %s timed out after %gs", name, timeout_s)
        return f"timed out after {timeout_s:g}s"
    except Exception as err:
        log.warning("readiness: %s failed: %s: %s", name, type(err).__name__, err)
        return type(err).__name__
    return "ok"


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness: database and bus reachable",
    responses={503: {"model": Readiness, "description": "A dependency is unreachable; `failed` names it."}},
)
async def readyz(state: StateDep) -> Response:
    bus_name = "redis" if state.settings.bus == "redis" else "bus"
    db, bus = await asyncio.gather(
        _check("database", lambda: asyncio.to_thread(_db_probe, state), state.probe_timeout_s),
        _check(bus_name, lambda: _bus_probe(state), state.probe_timeout_s),
    )
    checks = {"database": db, bus_name: bus}
    failed = [name for name, result in checks.items() if result != "ok"]
    body = Readiness(status="unavailable" if failed else "ready", checks=checks, failed=failed)
    return JSONResponse(body.model_dump(), status_code=503 if failed else 200)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format."}},
)
async def metrics(collectors: MetricsDep, state: StateDep, _: AdminKey) -> Response:
    await refresh_scaling_gauges(state)
    return Response(collectors.render(), media_type=CONTENT_TYPE_LATEST)
