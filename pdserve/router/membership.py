"""The router's side of membership: POST /register (join, or heartbeat when repeated) and POST /unregister.

An instance started with `pdserve serve --register-with ROUTER_URL` sends
/register {"url", "role", "interval"} every interval and /unregister {"url"}
on a clean stop (its side: pdserve/server/heartbeat.py); the registry drops an
instance whose heartbeats stopped (after `num_missed_heartbeats`). This module
turns bodies into registry calls and errors into 400/404 answers; the registry
owns membership and health.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from pdserve.http.errors import ApiError
from pdserve.router.registry import Registry


def add_membership_routes(app: FastAPI, registry: Registry, dependencies: list[Any]) -> None:
    """POST /register (join, or heartbeat when repeated) and POST /unregister on the router's app."""

    @app.post("/register", dependencies=dependencies)
    async def register(request: Request) -> Response:
        body = await _json_object(request)
        interval = body.get("interval")
        if interval is not None and (not isinstance(interval, (int, float)) or isinstance(interval, bool)):
            raise ApiError(400, f"interval must be a number of seconds, got {interval!r}", "invalid_request")
        try:
            inst, is_new = registry.register(str(body.get("url", "")), str(body.get("role", "")), interval)
        except ValueError as e:
            raise ApiError(400, str(e), "invalid_request") from None
        return JSONResponse(
            {
                "status": "registered" if is_new else "ok",
                "url": inst.url,
                "role": inst.role,
                "healthy": inst.is_healthy,
                "heartbeat_interval": inst.heartbeat_interval_s,
            }
        )

    @app.post("/unregister", dependencies=dependencies)
    async def unregister(request: Request) -> Response:
        body = await _json_object(request)
        try:
            inst = registry.unregister(str(body.get("url", "")))
        except ValueError as e:
            raise ApiError(400, str(e), "invalid_request") from None
        if inst is None:
            raise ApiError(404, f"no instance {body.get('url')!r} is known to this router", "not_found")
        return JSONResponse({"status": "unregistered", "url": inst.url, "role": inst.role})


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ApiError(
            400,
            'the body must be a JSON object like {"url": "http://127.0.0.1:8001", "role": "decode"}',
            "invalid_request",
        )
    return body
