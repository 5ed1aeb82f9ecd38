"""The gateway's pages for people (``/ui``): the human queue's inbox, the human organizer, planning together,
and episodes as timelines. Server-rendered (Jinja2), a few small scripts over one SSE stream, no build step.

* :func:`install` adds the routes, the static files, and the redirect to the sign-in page to an app
  (``create_app`` calls it when ``ASYNCTHINK_HUMAN_PAGES`` is on, after checking ``ASYNCTHINK_SECRET_KEY``);
* :func:`start` builds the pages' state in the app's lifespan (``app.state.human``).

Routes: ``/ui/login`` (sign in with a key of scope ``human``), ``/ui/inbox``, ``/ui/tasks/{id}/…``
(claim, renew, release, submit, undo), ``/ui/stream`` (SSE), ``/ui/organize``, ``/ui/plan`` and
``/ui/plans/{id}``, ``/ui/episodes`` and ``/ui/episodes/{id}``. Every route but the sign-in page and the
static files needs a live session; every POST needs the session's CSRF token. None is in the OpenAPI
schema: they are pages, not the API.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from services.gateway.human import inbox, organize, plan, stream, trace
from services.gateway.human.deps import SignInRequired
from services.gateway.human.session import Signer
from services.gateway.human.state import (
    STATIC,
    Feeds,
    HumanPages,
    KeyLiveness,
    make_templates,
    session_secret,
)
from services.human.endpoint import HumanQueueConfig
from shared.config import Settings


def install_check(settings: Settings) -> bytes:
    """The session secret; InsecureSettings without ``ASYNCTHINK_SECRET_KEY`` where it is required."""
    return session_secret(settings)


def install(app: FastAPI) -> None:
    """Add the pages' routes, static files and sign-in redirect to ``app``."""
    for module in (inbox, stream, organize, plan, trace):
        app.include_router(module.router)
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")

    async def sign_in(request: Request, exc: Exception) -> RedirectResponse:
        assert isinstance(exc, SignInRequired)
        return RedirectResponse(exc.next_url, status_code=303)

    app.add_exception_handler(SignInRequired, sign_in)


def start(app: FastAPI, settings: Settings, secret: bytes, state: Any, *, planning_backend: Any = None) -> HumanPages:
    """The pages' state for a started gateway (its bus, store and key verifier)."""
    from services.gateway.auth import KeyVerifier

    pages = HumanPages(
        settings=settings,
        signer=Signer(secret),
        config=HumanQueueConfig.from_settings(settings),
        feeds=Feeds(state.bus),
        liveness=KeyLiveness(state.session_factory, settings.auth_cache_s),
        templates=make_templates(),
        planning_backend=planning_backend,
        verifier=KeyVerifier(
            state.session_factory,
            admin_key=settings.admin_key.get_secret_value() if settings.admin_key else None,
            default_rate_limit=settings.rate_limit_per_minute,
            cache_s=settings.auth_cache_s,
        ),
    )
    app.state.human = pages
    return pages
