"""Error types and exception handlers: FastAPI's shape for the AsyncThink API, OpenAI's for ``/v1/chat``.

* :class:`SubmissionError` is raised by the shared submission code (:mod:`services.gateway.submission`)
  and translated by each API into its own error shape.
* :class:`OpenAIError` renders as ``{"error": {"message", "type", "param", "code"}}``; request
  validation errors and HTTP errors on the OpenAI-compatible paths are rendered the same way (400 for
  bad input, as OpenAI does), so the ``openai`` client raises its usual ``BadRequestError`` etc.
* Everywhere else validation errors keep FastAPI's 422 ``{"detail": [...]}`` shape.
* Error texts stored with an episode (a backend's exception, say) reach clients through :func:`scrub`:
  without URLs, cut to ``STORED_ERROR_CHARS``.

Nothing a client sent is echoed whole: a validation error's ``input`` and ``ctx`` values are cut to
``ECHO_CHARS`` characters (:func:`short`), at most ``MAX_ERRORS`` errors are listed, and pydantic's
documentation links are dropped. A database error is a 503 and any other unexpected error a 500, each
with a short fixed message: the exception (its SQL, parameters, URLs, traceback) goes to the log only.
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException

log = logging.getLogger(__name__)

ECHO_CHARS = 100  # the most characters of a client's value an error repeats
MAX_ERRORS = 20  # validation errors listed per response
MESSAGE_CHARS = 500
DATABASE_UNAVAILABLE = "the database is unavailable; try again later"
INTERNAL_ERROR = "internal error; it was logged on the gateway"

OPENAI_PREFIXES = ("/v1/chat/", "/v1/models")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout",
}


class SubmissionError(Exception):
    """A submission refused: ``status`` is the HTTP status, ``param`` the offending field, if any."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, episode_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.episode_id = episode_id


class OpenAIError(Exception):
    """An error rendered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.param = param
        self.code = code

    @classmethod
    def from_submission(cls, err: SubmissionError) -> OpenAIError:
        status = 400 if err.status == 422 else err.status
        code = {409: "problem_conflict"}.get(err.status, "episode_not_started" if err.status >= 500 else "invalid_value")
        return cls(status, err.message, param=err.param, code=code)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>)\]]+")
STORED_ERROR_CHARS = 1000


def scrub(text: str | None, limit: int = STORED_ERROR_CHARS) -> str | None:
    """A stored error text as clients may read it: URLs (of a model server, a database) replaced by
    ``<url>``, cut to ``limit`` characters. The stored text itself is left as it is, for operators."""
    if text is None:
        return None
    return _text(_URL.sub("<url>", text), limit)


def _is_openai_path(request: Request) -> bool:
    return is_openai_path(request.url.path)


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PREFIXES)


def _text(value: str, limit: int) -> str:
    """``value`` cut to ``limit`` characters, with anything UTF-8 cannot encode escaped."""
    cut = value if len(value) <= limit else f"{value[:limit]}… ({len(value)} characters)"
    return cut.encode("utf-8", "backslashreplace").decode("utf-8")


def short(value: Any, limit: int = ECHO_CHARS) -> Any:
    """A client's value as an error may repeat it: small scalars as they are, the rest cut to ``limit``
    characters of JSON text. Never fails and never returns what JSON cannot encode (NaN, surrogates)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if abs(value) < 10**18 else f"{str(value)[:20]}… ({len(str(value))} digits)"
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return _text(value, limit)
    try:
        text = json.dumps(value, default=str, ensure_ascii=False, allow_nan=True)
    except (TypeError, ValueError, RecursionError):
        text = type(value).__name__
    if len(text) <= limit and isinstance(value, dict | list) and "NaN" not in text and "Infinity" not in text:
        try:
            text.encode("utf-8")
            return value
        except UnicodeEncodeError:
            pass
    return _text(text, limit)


def sanitized_errors(errors: Any) -> list[dict[str, Any]]:
    """Validation errors with short ``loc``, ``msg``, ``input`` and ``ctx``, without documentation links."""
    out = []
    for e in list(errors)[:MAX_ERRORS]:
        item: dict[str, Any] = {
            "type": _text(str(e.get("type", "value_error")), 64),
            "loc": [p if isinstance(p, int) else _text(str(p), 64) for p in list(e.get("loc", ()))[:10]],
            "msg": _text(str(e.get("msg", "")), MESSAGE_CHARS),
        }
        if "input" in e:
            item["input"] = short(e["input"])
        ctx = e.get("ctx")
        if isinstance(ctx, dict):
            item["ctx"] = {_text(str(k), 64): short(v if isinstance(v, int | float | str) else str(v)) for k, v in ctx.items()}
        out.append(item)
    return out


def error_response(path: str, status: int, message: str, *, loc: str | None = None) -> JSONResponse:
    """An error in the shape of the API ``path`` belongs to (see the module docstring).

    With ``loc`` the error is about one part of the request (``body``, ``query``, ``path``): a 422 in
    FastAPI's validation shape, a 400 on the OpenAI-compatible paths.
    """
    message = _text(message, MESSAGE_CHARS)
    if is_openai_path(path):
        code = 400 if status == 422 else status
        err = OpenAIError(code, message, param=loc, code="invalid_value" if code < 500 else None)
        return JSONResponse(err.body(), status_code=code)
    if loc is not None and status == 422:
        return JSONResponse({"detail": [{"type": "value_error", "loc": [loc], "msg": message}]}, status_code=422)
    return JSONResponse({"detail": message}, status_code=status)


async def _openai_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, OpenAIError)
    return JSONResponse(exc.body(), status_code=exc.status)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = sanitized_errors(exc.errors())
    if not _is_openai_path(request):
        return JSONResponse({"detail": errors}, status_code=422)
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    messages = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg', '')}"
        for e in errors
    )
    message = _text(messages, 2 * MESSAGE_CHARS)
    return JSONResponse(OpenAIError(400, message, param=param, code="invalid_value").body(), status_code=400)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if not _is_openai_path(request):
        return await http_exception_handler(request, exc)
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    err = OpenAIError(exc.status_code, detail)
    return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)


async def _database_error(request: Request, exc: Exception) -> Response:
    log.error("database error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(request.url.path, 503, DATABASE_UNAVAILABLE)


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(request.url.path, 500, INTERNAL_ERROR)


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(OpenAIError, _openai_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(SQLAlchemyError, _database_error)
    app.add_exception_handler(Exception, _unexpected_error)
