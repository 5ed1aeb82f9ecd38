"""Input limits checked before any route runs: body size, NUL characters in the URL, JSON that no store takes.

:class:`InputGuardMiddleware` is pure ASGI (it never buffers a response, so SSE streams pass through):

* **body size**: a ``Content-Length`` over ``max_body_bytes`` is answered 413 at once; a body without one
  is counted as it arrives and refused the moment it passes the limit, so nothing is parsed;
* **NUL in the URL**: a ``%00`` in the path or the query string is refused (PostgreSQL text cannot hold
  it, and no id or filter of this API contains one);
* **JSON the API refuses**: arrays and objects nested deeper than ``MAX_JSON_DEPTH`` (no request of this
  API needs more, and a parser recursing into them runs out of stack), ``NaN``, ``Infinity`` and
  ``-Infinity`` (not JSON, and they cannot be written back out) and numbers too large for a float, NUL characters and unpaired UTF-16
  surrogates in any string or key (no database stores them, and a surrogate cannot be encoded as UTF-8).
  Cheap byte scans decide whether the body needs a closer look; only then is it parsed here (FastAPI
  parses it again, as usual).

Refusals use the API's own error shapes (:func:`services.gateway.errors.error_response`): FastAPI's
``{"detail": ...}`` (413, or 422 with a ``loc``), and OpenAI's on the OpenAI-compatible paths (413, 400).

Limits: only ``application/json`` bodies are inspected for the JSON rules; every route of this API takes
JSON, and a body of another type is refused by FastAPI's strict content type check anyway.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.gateway.errors import error_response

DEFAULT_MAX_BODY_BYTES = 1024 * 1024
BODY_METHODS = {"POST", "PUT", "PATCH"}
MAX_JSON_DEPTH = 32  # nested arrays and objects; a chat request needs 4

# Anything that could be a non-finite constant, an escaped NUL or an escaped surrogate: only then is the
# body parsed here. (A raw NUL or control character is not valid JSON: FastAPI answers it with a 422.)
_SUSPECT = re.compile(rb"NaN|Infinity|[eE][+]?\d{3}|\\u0000|\\u[dD][89a-fA-F]")
_BAD_CHARS = re.compile("[\x00\ud800-\udfff]")
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string literal (unrolled: linear time)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_OPENING = (ord("["), ord("{"))


def too_deep(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON text nests arrays and objects deeper than ``limit`` (brackets inside strings do
    not count). Linear in the body, and free for a body with few brackets."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    depth = 0
    for b in _STRING.sub(b"", body).translate(None, _NOT_BRACKET):
        if b in _OPENING:
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def human_bytes(n: int) -> str:
    for unit, size in (("MiB", 1024 * 1024), ("KiB", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes"


class _Refused(ValueError):
    """The JSON body holds something the API refuses; the message says what."""


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON number: numbers must be finite")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _Refused(f"{text[:40]} is out of range: numbers must be finite")
    return value


def _check_strings(value: Any) -> None:
    if isinstance(value, str):
        bad = _BAD_CHARS.search(value)
        if bad is not None:
            what = "a NUL character" if bad.group() == "\x00" else "an unpaired UTF-16 surrogate"
            raise _Refused(f"strings must not contain {what} (U+{ord(bad.group()):04X})")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_strings(key)
            _check_strings(item)
    elif isinstance(value, list):
        for item in value:
            _check_strings(item)


def json_problem(body: bytes) -> str | None:
    """Why the API refuses this JSON body, or None (also None for a body that is not JSON at all:
    FastAPI reports that itself)."""
    if too_deep(body):
        return f"arrays and objects may be nested at most {MAX_JSON_DEPTH} deep"
    if not _SUSPECT.search(body):
        return None
    try:
        value = json.loads(body, parse_constant=_no_constant, parse_float=_finite)
    except _Refused as err:
        return str(err)
    except (ValueError, RecursionError):  # not JSON (or not UTF-8): FastAPI's own error says so
        return None
    try:
        _check_strings(value)
    except _Refused as err:
        return str(err)
    return None


class InputGuardMiddleware:
    """Refuse oversized bodies, NUL characters in the URL and unstorable JSON (see the module doc)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))
        if "\x00" in path or b"%00" in scope.get("query_string", b"") or b"\x00" in scope.get(
            "query_string", b""
        ):
            where = "path" if "\x00" in path else "query"
            await self._refuse(scope, receive, send, 422, "NUL characters are not allowed in the URL", where)
            return
        if scope.get("method") not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        too_big = f"the request body is larger than {human_bytes(limit)}; send less"
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await self._refuse(scope, receive, send, 413, too_big)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._refuse(scope, receive, send, 413, too_big)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if _is_json(scope):
            problem = json_problem(body)
            if problem is not None:
                await self._refuse(scope, receive, send, 422, problem, "body")
                return
        await self.app(scope, _replay(body, receive), send)

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, status: int, message: str, loc: str | None = None
    ) -> None:
        response = error_response(str(scope.get("path", "")), status, message, loc=loc)
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _is_json(scope: Scope) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            return media == b"application/json" or media.endswith(b"+json")
    return True  # FastAPI reads a body without a content type as JSON


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the app the body already read, then defers to the real one."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
