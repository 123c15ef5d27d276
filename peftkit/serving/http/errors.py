"""OpenAI-style error bodies, and the mapping from every failure to a status code.

Every error answers ``{"error": {"message", "type", "param", "code"}}`` as OpenAI's API does, so
the official clients raise their usual exceptions (``openai.BadRequestError`` for 400,
``NotFoundError`` for 404, ``RateLimitError`` for 429, ...). A body's invalid value names the field
in ``message`` and in ``param``.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from peftkit.serving.types import PromptTooLong, QueueFull, ServingError, UnknownExpert

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error the server answers with ``status`` and an OpenAI-style body.

    Args:
        param: the request field at fault (``None`` when no one field is).
        code: a short machine-readable code (``model_not_found``, ``queue_full``, ...).
        headers: extra response headers (``Retry-After`` on 429).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def from_serving_error(exc: ServingError, param: str | None = None) -> APIError:
    """The :class:`APIError` for one of the engine's or registry's errors."""
    if isinstance(exc, QueueFull):
        retry = str(max(1, math.ceil(exc.retry_after)))
        return APIError(429, str(exc), code="queue_full", headers={"Retry-After": retry})
    if isinstance(exc, UnknownExpert):
        return APIError(404, str(exc), param=param or "model", code="model_not_found")
    if isinstance(exc, PromptTooLong):
        return APIError(413, str(exc), param=param, code="prompt_too_long")
    return APIError(exc.status, str(exc))


def describe_request_errors(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """``(message, param)`` for a body that failed validation: ``field=value: rule`` per error.

    The ``body`` prefix of FastAPI's locations is dropped, so ``temperature`` (not
    ``body.temperature``) is named, and ``param`` is the first error's top-level field.
    """
    parts, param = [], None
    for error in errors:
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        if error.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON: {error.get('ctx', {}).get('error', error['msg'])}")
            continue
        if error.get("type") == "missing" and not loc:
            parts.append("the body is empty; send a JSON object")
            continue
        where = ".".join(loc) or "body"
        param = param or (loc[0] if loc else None)
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        if error.get("type") == "extra_forbidden":
            parts.append(f"{where}: unknown field (not part of this endpoint's request body)")
        elif error.get("type") in ("value_error", "missing", "assertion_error") or "input" not in error:
            parts.append(f"{where}: {message}")
        else:
            shown = repr(error["input"])
            parts.append(f"{where}={shown if len(shown) <= 80 else shown[:77] + '...'}: {message}")
    return "; ".join(parts), param


def install_error_handlers(app: FastAPI, on_error: Any = None) -> None:
    """Answer every error with an OpenAI-style body. ``on_error(status)`` counts them (metrics)."""

    def answer(error: APIError) -> JSONResponse:
        if on_error is not None:
            on_error(error.status)
        return error.response()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return answer(exc)

    @app.exception_handler(ServingError)
    async def _serving_error(request: Request, exc: ServingError) -> JSONResponse:
        return answer(from_serving_error(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_request_errors(list(exc.errors()))
        return answer(APIError(400, message, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        return answer(APIError(exc.status_code, message, headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return answer(APIError(500, f"internal error: {type(exc).__name__}: {exc}"))
