"""FastAPI routes whose JSON bodies go through parse_json_body (UTF-8, nesting depth, finite numbers).

FastAPI parses a JSON body with plain json.loads: NaN and Infinity pass, and a body nested a few thousand deep
raises RecursionError. A route of this class parses the body first, where FastAPI would (a JSON content type),
and hands FastAPI the result; a bad body is an ApiError 400 that the app's handlers answer. Bodies without a
JSON content type are left to FastAPI, as before (it does not parse them, so the API-key check still comes first).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from pdserve.http.limits import parse_json_body


class CheckedJsonRequest(Request):
    """A Request whose json() is parse_json_body's, parsed once."""

    async def json(self) -> Any:
        if not hasattr(self, "_checked_json"):
            self._checked_json = parse_json_body(await self.body())
        return self._checked_json


class JsonBodyRoute(APIRoute):
    """Set as an app's `router.route_class` before its routes are added."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            request = CheckedJsonRequest(request.scope, request.receive)
            if is_json(request.headers.get("content-type")) and await request.body():
                # NOTE: parsed here, outside FastAPI's body parsing, which turns any error into its own bare 400
                await request.json()
            return await handler(request)

        return checked


def is_json(content_type: str | None) -> bool:
    """Whether FastAPI parses a body of this content type as JSON: application/json or application/*+json."""
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))
