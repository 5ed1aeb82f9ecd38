"""What one running gateway holds: settings, the bus, the session factory, metrics, the served models.

Built by the app's lifespan (:mod:`services.gateway.app`) and read by routes only through the typed
dependencies of :mod:`services.gateway.deps`; nothing here opens a connection.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from services.gateway.metrics import GatewayMetrics
from services.gateway.ratelimit import MemoryRateLimiter, RateLimiter
from shared.bus.base import Bus
from shared.config import Settings

if TYPE_CHECKING:
    from services.gateway.auth import KeyVerifier

# Served model names for the OpenAI-compatible API: name -> task ("auto": the text picks a graded task
# when it states one, else free-form chat).
CHAT_MODELS: dict[str, str] = {
    "asyncthink": "auto",
    "asyncthink-chat": "chat",
    "asyncthink-countdown": "countdown",
    "asyncthink-math": "math",
    "asyncthink-sudoku": "sudoku",
}


@dataclass
class GatewayState:
    settings: Settings
    bus: Bus
    session_factory: sessionmaker[Session]
    metrics: GatewayMetrics
    model_id: str  # the served model (weights) every episode of this gateway names
    embedded: bool  # an organizer runs inside this process
    started_at: float  # unix time, for /v1/models' ``created``
    sse_heartbeat_s: float = 15.0  # idle time between SSE heartbeat comments
    publish_timeout_s: float = 5.0  # a bus publish slower than this fails the submission
    probe_timeout_s: float = 5.0  # /readyz waits this long per dependency
    chat_models: dict[str, str] = field(default_factory=lambda: dict(CHAT_MODELS))
    organizer_task: asyncio.Task[None] | None = None
    verifier: KeyVerifier | None = None  # None: no keys required (loopback only)
    rate_limiter: RateLimiter = field(default_factory=MemoryRateLimiter)
    backend: Any = None  # the embedded organizer's model (None in the distributed setup unless injected)
    backlog_checked: tuple[float, Any] | None = None  # (time.monotonic(), Backlog) of the last look
