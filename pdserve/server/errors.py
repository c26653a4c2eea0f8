"""OpenAI-style errors: {"error": {"message", "type", "code"}}. Never a traceback to a client."""

from __future__ import annotations

from fastapi.responses import JSONResponse


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
