"""OpenAI-style error answers, {"error": {"message", "type", "code"}}, for the API server and the router.

A route raises ApiError for a client's mistake; `add_error_handlers` turns that and FastAPI's own errors into
this shape, and anything unexpected into a 500 that names the log to read: never a traceback to a client. This
module knows nothing of engines or routing: an app adds handlers for its own exception types.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, code: str | None = None, type_: str = "invalid_request_error"
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.type = type_


def error_response(
    status: int, message: str, code: str | None = None, type_: str = "invalid_request_error"
) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "code": code}}, status_code=status)


def describe_validation(exc: RequestValidationError) -> str:
    """The first five problems of a request body that failed validation, each as 'field.path: message'."""
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    message = "invalid request: " + "; ".join(parts)
    return message.encode("utf-8", "backslashreplace").decode()  # a lone surrogate in a key cannot be sent


def add_error_handlers(app: FastAPI, logger: logging.Logger, log_name: str) -> None:
    """Answer ApiError with its own status, code and type; a body that fails validation with 400
    invalid_request; a Starlette HTTPException (unknown path, wrong method) with its status and code null; any
    other exception with 500 internal_error, logged with its traceback to `logger` and a message pointing at
    "the `log_name` log"."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.code, exc.type)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, describe_validation(exc), "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), None)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error")
        return error_response(
            500, f"internal error ({type(exc).__name__}); see the {log_name} log", "internal_error", "server_error"
        )
