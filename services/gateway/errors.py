"""Error types and exception handlers: FastAPI's shape for the AsyncThink API, OpenAI's for ``/v1/chat``.

* :class:`SubmissionError` is raised by the shared submission code (:mod:`services.gateway.submission`)
  and translated by each API into its own error shape.
* :class:`OpenAIError` renders as ``{"error": {"message", "type", "param", "code"}}``; request
  validation errors and HTTP errors on the OpenAI-compatible paths are rendered the same way (400 for
  bad input, as OpenAI does), so the ``openai`` client raises its usual ``BadRequestError`` etc.
* Everywhere else validation errors keep FastAPI's 422 ``{"detail": [...]}`` shape.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

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
        code = "episode_not_started" if err.status >= 500 else "invalid_value"
        return cls(status, err.message, param=err.param, code=code)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _is_openai_path(request: Request) -> bool:
    return request.url.path.startswith(OPENAI_PREFIXES)


async def _openai_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, OpenAIError)
    return JSONResponse(exc.body(), status_code=exc.status)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    if not _is_openai_path(request):
        return await request_validation_exception_handler(request, exc)
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    messages = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg', '')}"
        for e in errors
    )
    return JSONResponse(OpenAIError(400, messages, param=param, code="invalid_value").body(), status_code=400)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if not _is_openai_path(request):
        return await http_exception_handler(request, exc)
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    err = OpenAIError(exc.status_code, detail)
    return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(OpenAIError, _openai_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
