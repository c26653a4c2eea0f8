"""The API key that guards /v1/* on the API server and the router: `Authorization: Bearer KEY`.

It compares in constant time and knows nothing of which routes it guards: an app passes the dependency to the
routes it protects (/health and /metrics stay open).
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable

from fastapi import Request

from pdserve.http.errors import ApiError


def require_api_key(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency: raises ApiError 401 invalid_api_key unless the request sends `Bearer <api_key>`
    (the scheme in any case, the key exactly). With `api_key` None it lets every request through."""

    async def check_api_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(token.encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'", "invalid_api_key")

    return check_api_key


SECRET_HEADER = "X-PDServe-Cluster-Secret"  # a deployment's cluster secret on /register and /unregister
