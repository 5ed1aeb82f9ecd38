"""Typed FastAPI dependencies: routes declare what they need and never build clients themselves.

``SessionDep`` is a SQLAlchemy session for one request (closed when the request ends; routes commit
explicitly); ``BusDep`` the process's bus; ``SettingsDep`` its settings; ``StateDep`` the whole
:class:`~services.gateway.state.GatewayState` for the few routes that need more (readiness, streams
that must not hold a session open for minutes).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from services.gateway.metrics import GatewayMetrics
from services.gateway.state import GatewayState
from shared.bus.base import Bus
from shared.config import Settings


def get_state(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state


StateDep = Annotated[GatewayState, Depends(get_state)]


def get_db(state: StateDep) -> Iterator[Session]:
    with state.session_factory() as session:
        yield session


def get_bus(state: StateDep) -> Bus:
    return state.bus


def get_settings(state: StateDep) -> Settings:
    return state.settings


def get_metrics(state: StateDep) -> GatewayMetrics:
    return state.metrics


SessionDep = Annotated[Session, Depends(get_db)]
BusDep = Annotated[Bus, Depends(get_bus)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[GatewayMetrics, Depends(get_metrics)]
