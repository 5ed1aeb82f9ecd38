"""The gateway's FastAPI application: :func:`create_app` and its lifespan.

Two setups, chosen by ``settings.bus``:

* **embedded** (``inprocess``, the default): the lifespan creates an :class:`InProcessBus`, migrates the
  SQLite (or other) database at ``settings.database_url``, opens a local model backend
  (``open_service_backend(settings)``, or the injected ``embedded_backend``) and runs an
  :class:`~services.organizer.service.OrganizerService` as a task in the same event loop, so
  ``asyncthink serve gateway`` alone answers problems on a laptop;
* **distributed** (``redis``): a :class:`RedisStreamsBus` on ``settings.redis_url``; the organizers run
  as their own services and the schema is migrated by the deployment (compose's migration job).

An injected ``bus`` or ``session_factory`` is used as given and not closed or migrated by the app
(tests, and callers that own them). Routes reach all of this only through :mod:`services.gateway.deps`.

Limits: the embedded organizer shares the event loop with the HTTP server, so a backend that blocks
the loop (a CPU model without a thread) slows requests down; use the distributed setup for real load.
Nothing here retries: a database or Redis that is down shows up in ``/readyz`` and as 503s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from services.gateway.auth import AnyKey, KeyVerifier
from services.gateway.errors import install_handlers
from services.gateway.limits import InputGuardMiddleware
from services.gateway.metrics import GatewayMetrics, MetricsMiddleware
from services.gateway.ratelimit import MemoryRateLimiter, RateLimiter, RedisRateLimiter
from services.gateway.routes import admin, episodes, events, health, openai_compat, problems
from services.gateway.state import GatewayState
from shared.agents import WorkerEndpoint
from shared.backends.base import ModelBackend
from shared.bus.base import Bus
from shared.config import Settings, get_settings

log = logging.getLogger(__name__)

DESCRIPTION = """\
REST gateway of **AsyncThink** (asynchronous thinking with Fork/Join, arXiv 2510.26658).

* `POST /v1/problems` submits a problem (202 + episode id); `GET /v1/episodes/{id}` reads the result
  (answer, rewards, critical-path latency T, concurrency η, segments); `GET /v1/episodes/{id}/events`
  follows it live as Server-Sent Events.
* `POST /v1/chat/completions` and `GET /v1/models` are OpenAI-compatible: the official `openai` client
  works unmodified; the model name picks the task and the answer carries the episode id.
* `/healthz`, `/readyz` and `/metrics` (Prometheus) are for operators.

Every route but `/healthz` and `/readyz` needs an API key, sent as `Authorization: Bearer atk_…` or
`X-API-Key: atk_…` (scopes: `submit`, `read`, `admin`), unless the gateway runs without keys on loopback.
People (keys of scope `human`) use the pages under `/ui`, which are not part of this API.
"""

ORGANIZER_STOP_TIMEOUT_S = 10.0


def served_model_id(model: str) -> str:
    """A short name for ``settings.model``: a directory's name, ``openai:URL#name``'s name, else the spec.

    Query parameters (``?tokenizer=...``) are dropped. The embedded setup names the backend's
    ``model_id`` instead; this is what a distributed gateway, which opens no backend, reports.
    """
    spec = model.split("?", 1)[0]
    if "#" in spec:
        return spec.rsplit("#", 1)[1] or spec
    if ":" in spec.split("/", 1)[0] and not Path(spec).exists():
        return spec
    return Path(spec).name or spec


def create_app(
    settings: Settings | None = None,
    *,
    bus: Bus | None = None,
    session_factory: sessionmaker[Session] | None = None,
    embedded_backend: ModelBackend | None = None,
    bind_host: str | None = None,
) -> FastAPI:
    """The gateway app (see the module docstring); nothing connects until the lifespan starts.

    ``bind_host`` is the address the server binds; with it, ``settings.requires_keys`` decides whether
    API keys are needed, and :class:`~shared.config.InsecureSettings` is raised for ``auth=off`` on an
    interface other than loopback (the app is not built).
    """
    settings = settings or get_settings()
    if settings.bus not in ("inprocess", "redis"):
        raise ValueError(
            f"settings.bus must be 'inprocess' or 'redis', got {settings.bus!r} (ASYNCTHINK_BUS)"
        )
    require_keys = settings.requires_keys(bind_host)
    metrics = GatewayMetrics()
    secret = None
    if settings.human_pages:
        from services.gateway import human

        secret = human.install_check(settings)  # InsecureSettings without ASYNCTHINK_SECRET_KEY where required

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            state = await _start(stack, settings, metrics, bus, session_factory, embedded_backend)
            if require_keys:
                admin = settings.admin_key.get_secret_value() if settings.admin_key else None
                if admin is None:
                    log.warning(
                        "API keys are required and ASYNCTHINK_ADMIN_KEY is not set: only keys made with "
                        "`asyncthink keys create` get in"
                    )
                state.verifier = KeyVerifier(
                    state.session_factory,
                    admin_key=admin,
                    default_rate_limit=settings.rate_limit_per_minute,
                    cache_s=settings.auth_cache_s,
                )
            app.state.gateway = state
            if secret is not None:
                from services.gateway import human

                human.start(app, settings, secret, state, planning_backend=state.backend)
            log.info(
                "gateway ready: %s bus, model %s%s, %s",
                settings.bus,
                state.model_id,
                ", organizer embedded" if state.embedded else "",
                "API keys required" if require_keys else "no API keys (loopback only)",
            )
            yield

    app = FastAPI(
        title="AsyncThink gateway",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # the documentation routes below need a key like every other route
        redoc_url=None,
        openapi_url=None,
        openapi_tags=[
            {"name": "problems", "description": "Submit problems; each runs as one episode."},
            {"name": "episodes", "description": "Read episodes and follow them live."},
            {
                "name": "openai-compatible",
                "description": "Chat completions and models, as OpenAI serves them.",
            },
            {"name": "operations", "description": "Liveness, readiness and Prometheus metrics."},
        ],
    )
    install_handlers(app)
    app.add_middleware(InputGuardMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: counts refusals too
    for module in (problems, episodes, events, openai_compat, health, admin):  # admin: admin keys only
        app.include_router(module.router)
    if secret is not None:
        from services.gateway import human

        human.install(app)  # the pages for people under /ui
    _documentation(app)
    app.state.require_keys = require_keys
    return app


def _documentation(app: FastAPI) -> None:
    """``/openapi.json``, ``/docs`` and ``/redoc``, each behind a key (any scope)."""

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(_: AnyKey) -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def docs(_: AnyKey) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs")

    @app.get("/redoc", include_in_schema=False)
    async def redoc(_: AnyKey) -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")


async def _start(
    stack: contextlib.AsyncExitStack,
    settings: Settings,
    metrics: GatewayMetrics,
    bus: Bus | None,
    session_factory: sessionmaker[Session] | None,
    embedded_backend: ModelBackend | None,
) -> GatewayState:
    """Open what the gateway needs; everything opened here is closed by ``stack``, in reverse order."""
    embedded = settings.bus == "inprocess"
    if session_factory is None:
        from shared.store import db

        if embedded:
            # The embedded setup owns its database; the services' schema is migrated by the deployment.
            await asyncio.to_thread(db.migrate, settings.database_url)
        engine: Engine = db.make_engine(settings.database_url)
        stack.callback(engine.dispose)
        session_factory = db.session_factory(engine)
    if bus is None:
        if embedded:
            from shared.bus.inprocess import InProcessBus

            bus = InProcessBus()
        else:
            from shared.bus.redis_streams import RedisStreamsBus

            # every SSE follower holds a connection while it waits: a larger pool than a worker's
            bus = RedisStreamsBus(settings.redis_url, max_connections=settings.redis_max_connections or 256)
        stack.push_async_callback(bus.close)
    # in memory for one process; in Redis, shared by every gateway replica
    rate_limiter: RateLimiter = MemoryRateLimiter() if embedded else RedisRateLimiter(settings.redis_url)
    stack.push_async_callback(rate_limiter.close)
    state = GatewayState(
        settings=settings,
        bus=bus,
        session_factory=session_factory,
        metrics=metrics,
        model_id=served_model_id(settings.model),
        embedded=embedded,
        started_at=time.time(),
        rate_limiter=rate_limiter,
    )
    if embedded:
        backend = embedded_backend
        if backend is None:
            from services.runtime import open_service_backend

            backend = await asyncio.to_thread(open_service_backend, settings)
            stack.push_async_callback(backend.aclose)
        state.model_id = backend.model_id
        state.backend = backend
        await _start_organizer(stack, state, backend)
    else:
        state.backend = embedded_backend  # distributed: only the pages' plan proposals use one (opened lazily)
    return state


async def _start_organizer(
    stack: contextlib.AsyncExitStack, state: GatewayState, backend: ModelBackend
) -> None:
    from services.organizer.service import OrganizerService
    from services.workers.tools import local_endpoints

    endpoints: dict[str | None, WorkerEndpoint] = dict(local_endpoints())
    if state.settings.human_pages:  # people answer @human forks on the gateway's pages
        from services.human.endpoint import human_endpoints
        from services.human.planner import LocalModelWorker

        endpoints |= human_endpoints(state.session_factory, state.bus, state.settings, model=LocalModelWorker(backend))
    service = OrganizerService(
        state.bus,
        state.session_factory,
        backend,
        endpoints=endpoints,
        consumer_name="gateway-embedded",
        read_block_ms=500,
        shutdown_grace_s=5.0,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(service.run_forever(stop), name="embedded-organizer")
    task.add_done_callback(_log_organizer_exit)
    state.organizer_task = task

    async def shutdown() -> None:
        stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), ORGANIZER_STOP_TIMEOUT_S)
        except TimeoutError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        except Exception:  # already logged by the done callback
            pass

    stack.push_async_callback(shutdown)


def _log_organizer_exit(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the embedded organizer stopped", exc_info=task.exception())
