"""``/healthz`` (the process answers), ``/readyz`` (database and bus reachable) and ``/metrics``.

``/readyz`` probes each dependency with a timeout (``probe_timeout_s``): the database with
``SELECT 1`` through the gateway's session factory, the bus with ``ping()`` where the bus has one
(Redis) or an empty non-blocking read otherwise. The 503 body names each failed dependency and why.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import text

from services.gateway.deps import MetricsDep, StateDep
from services.gateway.metrics import CONTENT_TYPE_LATEST
from services.gateway.state import GatewayState
from shared.store import mask_url

router = APIRouter(tags=["operations"])

READY_PROBE_STREAM = "asyncthink:gateway:readyz"


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


async def _check(probe: Callable[[], Awaitable[Any]], timeout_s: float) -> str:
    try:
        await asyncio.wait_for(probe(), timeout_s)
    except TimeoutError:
        return f"timed out after {timeout_s:g}s"
    except Exception as err:
        reason = str(err).strip().splitlines()
        return f"{type(err).__name__}: {reason[0] if reason else ''}".rstrip(": ")
    return "ok"


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness: database and bus reachable",
    responses={503: {"model": Readiness, "description": "A dependency is unreachable; `failed` names it."}},
)
async def readyz(state: StateDep) -> Response:
    db, bus = await asyncio.gather(
        _check(lambda: asyncio.to_thread(_db_probe, state), state.probe_timeout_s),
        _check(lambda: _bus_probe(state), state.probe_timeout_s),
    )
    bus_name = "redis" if state.settings.bus == "redis" else "bus"
    checks = {"database": db, bus_name: bus}
    failed = [name for name, result in checks.items() if result != "ok"]
    if "database" in failed:
        bind = state.session_factory.kw.get("bind")
        checks["database"] = f"{mask_url(getattr(bind, 'url', state.settings.database_url))}: {db}"
    body = Readiness(status="unavailable" if failed else "ready", checks=checks, failed=failed)
    return JSONResponse(body.model_dump(), status_code=503 if failed else 200)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format."}},
)
async def metrics(collectors: MetricsDep) -> Response:
    return Response(collectors.render(), media_type=CONTENT_TYPE_LATEST)
