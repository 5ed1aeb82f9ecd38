"""Who is on a page: the session cookie as FastAPI dependencies, with CSRF checks on every POST.

* ``PagePerson``: a page (GET). Without a live session: a redirect (303) to the sign-in page, which
  comes back to the page after.
* ``ActionPerson``: anything else (actions, fragments, the live stream). Without a live session: 401;
  a ``POST`` without the session's CSRF token (``X-CSRF-Token`` header or ``csrf`` form field): 403.

Forms are ``application/x-www-form-urlencoded`` and parsed here (:func:`form`); no multipart.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import parse_qs, quote

from fastapi import Depends, HTTPException, Request

from services.gateway.human.session import SESSION_COOKIE, Person, csrf_ok
from services.gateway.human.state import HumanPages
from shared.auth import BOOTSTRAP_ADMIN_ID

MAX_FORM_BYTES = 256 * 1024


class SignInRequired(Exception):
    """No live session on a page: the app answers with a redirect to the sign-in page."""

    def __init__(self, next_url: str) -> None:
        super().__init__(next_url)
        self.next_url = next_url


def get_pages(request: Request) -> HumanPages:
    pages: HumanPages | None = getattr(request.app.state, "human", None)
    if pages is None:
        raise HTTPException(404, detail="the pages for people are off (ASYNCTHINK_HUMAN_PAGES=false)")
    return pages


PagesDep = Annotated[HumanPages, Depends(get_pages)]


async def form(request: Request) -> dict[str, str]:
    """The request's urlencoded form (one value per field, the last one given); cached per request."""
    cached = getattr(request.state, "form", None)
    if cached is not None:
        return dict(cached)
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise HTTPException(413, detail="the form is too large")
    kind = request.headers.get("content-type", "")
    values: dict[str, str] = {}
    if body and (kind.startswith("application/x-www-form-urlencoded") or kind.startswith("text/plain")):
        try:
            parsed = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=200)
        except (UnicodeDecodeError, ValueError) as err:
            raise HTTPException(422, detail="the form is not valid UTF-8 urlencoded data") from err
        values = {k: v[-1] for k, v in parsed.items()}
    if any("\x00" in v for v in values.values()):
        raise HTTPException(422, detail="the form holds a NUL character")
    request.state.form = values
    return dict(values)


async def session_person(request: Request, pages: HumanPages) -> Person | None:
    """The live person of the request's session cookie, or None."""
    data = pages.signer.load("session", request.cookies.get(SESSION_COOKIE))
    person = Person.from_json(data) if data is not None else None
    if person is None:
        return None
    if not await pages.liveness.live(person.key_id, bootstrap=person.key_id == BOOTSTRAP_ADMIN_ID):
        return None
    return person


async def page_person(request: Request, pages: PagesDep) -> Person:
    person = await session_person(request, pages)
    if person is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise SignInRequired(f"/ui/login?next={quote(target, safe='')}")
    return person


async def action_person(request: Request, pages: PagesDep) -> Person:
    person = await session_person(request, pages)
    if person is None:
        raise HTTPException(401, detail="sign in first: no live session (GET /ui/login)")
    if request.method not in ("GET", "HEAD"):
        given = request.headers.get("X-CSRF-Token")
        if given is None:
            given = (await form(request)).get("csrf")
        if not csrf_ok(person.csrf, given):
            raise HTTPException(403, detail="missing or wrong CSRF token: reload the page")
    return person


PagePerson = Annotated[Person, Depends(page_person)]
ActionPerson = Annotated[Person, Depends(action_person)]
