"""Rendering pages and small helpers shared by the routes of the pages for people."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse

from services.gateway.human.session import Person
from services.gateway.human.state import HumanPages
from services.human.notices import notice, publish_notice
from shared.bus.base import Bus

# No inline script or style anywhere: every page loads its code from /ui/static.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

NAV = (("inbox", "Inbox", "/ui/inbox"), ("organize", "Organize", "/ui/organize"), ("plan", "Plan", "/ui/plan"),
       ("episodes", "Episodes", "/ui/episodes"))


def render(
    pages: HumanPages, name: str, *, person: Person | None, active: str = "", status: int = 200, **context: Any
) -> HTMLResponse:
    template = pages.templates.get_template(name)
    html = template.render(person=person, nav=NAV, active=active, **context)
    return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)


def fragment(pages: HumanPages, name: str, *, person: Person, **context: Any) -> HTMLResponse:
    html = pages.templates.get_template(name).render(person=person, **context)
    return HTMLResponse(html, headers=SECURITY_HEADERS)


def conflict(reason: str, message: str, status: int = 409) -> JSONResponse:
    return JSONResponse({"detail": message, "reason": reason}, status_code=status, headers=SECURITY_HEADERS)


async def announce(bus: Bus, action: str, row: Any, person: Person) -> None:
    await publish_notice(bus, notice(action, row, actor=person.name))


def secure(request: Request, pages: HumanPages) -> bool:
    return pages.secure_cookies or request.url.scheme == "https"


def safe_next(value: str | None) -> str:
    """Where to go after sign-in: a path of these pages, never another site."""
    if value and value.startswith("/ui") and not value.startswith("//") and "\\" not in value:
        return value
    return "/ui/inbox"
