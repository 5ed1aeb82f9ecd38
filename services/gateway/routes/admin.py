"""Operator routes of the trainer service and its versions (``/v1/admin/...``): ADMIN ONLY.

These routes change which weights the whole fleet serves: every one requires an API key of the ``admin``
scope (the router's dependency).

Reading (from the store, ``model_versions``; :mod:`shared.store.versions` documents the metrics):

* ``GET /v1/admin/versions`` — every version, oldest first (``?model_id=`` to pick a lineage,
  ``?full=true`` for all metrics);
* ``GET /v1/admin/versions/{version}`` — one version: parent, path, content hash, data window, update
  statistics, gate, swaps, events;
* ``GET /v1/admin/cycles/{cycle}`` — what a trainer cycle produced, with its metrics.

Acting (a :class:`~shared.control.TrainerCommand` to the trainer service over the bus, answered by it;
504 when no trainer answers in ``timeout_s``; 409 when it refused or a process could not take the
version):

* ``GET /v1/admin/trainer`` — status: paused, cycle, phase, serving version, the last cycle;
* ``POST /v1/admin/trainer/pause`` / ``resume`` — training stops after the running cycle / goes on;
* ``POST /v1/admin/versions/{version}/promote`` / ``rollback`` — serve that version everywhere (its
  checkpoint's hash is checked first, so the weights are bit for bit the registered ones). Body (optional):
  ``{"reason": "..."}``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Body, Depends, HTTPException, Query
from fastapi.responses import JSONResponse

from services.gateway.auth import Scope, requires
from services.gateway.deps import StateDep
from shared.control import TrainerCommand, ask_trainer
from shared.store import versions as registry

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(requires(Scope.ADMIN))])


def _summary(row: Any) -> dict[str, Any]:
    out = registry.public(row)
    metrics = out.pop("metrics")
    gate = metrics.get("gate") or {}
    window = metrics.get("data_window") or {}
    out["gate"] = {k: gate.get(k) for k in ("metric", "delta", "passed")} if gate else None
    out["episodes"] = window.get("used")
    out["served"] = metrics.get("served")
    return out


async def _read(state: Any, fn: Any) -> Any:
    def run() -> Any:
        with state.session_factory() as session:
            return fn(session)

    return await asyncio.to_thread(run)


@router.get("/versions", summary="Every model version, oldest first (admin)")
async def list_versions(
    state: StateDep, model_id: str | None = None, full: bool = Query(False, description="include all metrics")
) -> list[dict[str, Any]]:
    rows = await _read(state, lambda s: registry.list_versions(s, model_id=model_id))
    return [registry.public(r) if full else _summary(r) for r in rows]


@router.get("/versions/{version}", summary="One model version with its metrics (admin)")
async def get_version(state: StateDep, version: str, model_id: str | None = None) -> dict[str, Any]:
    row = await _read(state, lambda s: registry.find_version(s, version=version, model_id=model_id))
    if row is None:
        raise HTTPException(404, f"no version {version!r} in model_versions")
    return registry.public(row)


@router.get("/cycles/{cycle}", summary="What a trainer cycle produced, with its metrics (admin)")
async def get_cycle(state: StateDep, cycle: int, model_id: str | None = None) -> list[dict[str, Any]]:
    rows = await _read(state, lambda s: registry.by_cycle(s, cycle=cycle, model_id=model_id))
    if not rows:
        raise HTTPException(404, f"no version from trainer cycle {cycle}")
    return [registry.public(r) for r in rows]


async def _command(state: Any, command: TrainerCommand, timeout_s: float) -> JSONResponse:
    try:
        reply = await ask_trainer(state.bus, command, timeout_s=timeout_s)
    except TimeoutError as exc:
        raise HTTPException(504, str(exc)) from exc
    return JSONResponse(reply.model_dump(mode="json"), status_code=200 if reply.ok else 409)


@router.get("/trainer", summary="The trainer service's status (admin)")
async def trainer_status(state: StateDep, timeout_s: float = Query(10.0, gt=0, le=300)) -> JSONResponse:
    return await _command(state, TrainerCommand(op="status"), timeout_s)


@router.post("/trainer/pause", summary="Pause training after the running cycle (admin)")
async def pause(state: StateDep, timeout_s: float = Query(10.0, gt=0, le=300)) -> JSONResponse:
    return await _command(state, TrainerCommand(op="pause"), timeout_s)


@router.post("/trainer/resume", summary="Resume training (admin)")
async def resume(state: StateDep, timeout_s: float = Query(10.0, gt=0, le=300)) -> JSONResponse:
    return await _command(state, TrainerCommand(op="resume"), timeout_s)


@router.post("/versions/{version}/promote", summary="Serve this version everywhere (admin)")
async def promote(
    state: StateDep, version: str, body: dict[str, Any] | None = Body(None),
    timeout_s: float = Query(300.0, gt=0, le=3600),
) -> JSONResponse:  # fmt: skip
    reason = str((body or {}).get("reason", ""))
    return await _command(state, TrainerCommand(op="promote", version=version, reason=reason), timeout_s)


@router.post("/versions/{version}/rollback", summary="Roll the fleet back to this version (admin)")
async def rollback(
    state: StateDep, version: str, body: dict[str, Any] | None = Body(None),
    timeout_s: float = Query(300.0, gt=0, le=3600),
) -> JSONResponse:  # fmt: skip
    reason = str((body or {}).get("reason", ""))
    return await _command(state, TrainerCommand(op="rollback", version=version, reason=reason), timeout_s)
