"""Router membership, both sides: the instance's heartbeat and the router's /register and /unregister.

An instance started with `pdserve serve --register-with ROUTER_URL` runs
`heartbeat()`: POST /register {"url", "role", "interval"} every interval, POST
/unregister {"url"} on stop. A router that is down or refuses is logged, never
fatal: the instance keeps serving and keeps trying. The interval in the body
tells the router when heartbeats stopped (after `num_missed_heartbeats`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from pdserve.router.registry import Registry
from pdserve.server.errors import ApiError

logger = logging.getLogger(__name__)

UNREGISTER_TIMEOUT_S = 2.0


async def _post(
    session: aiohttp.ClientSession, url: str, body: dict[str, object], headers: dict[str, str], timeout_s: float
) -> str | None:
    """None on a 2xx answer, else what went wrong."""
    try:
        async with session.post(
            url, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as resp:
            text = await resp.text()
            return None if resp.status < 300 else f"HTTP {resp.status}: {text[:300]}"
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


async def heartbeat(
    router_url: str, self_url: str, role: str, interval: float, stop: asyncio.Event, api_key: str | None = None
) -> None:
    """Register `self_url` as `role` with the router every `interval` seconds until `stop` is set, then unregister.

    Never raises for network or router errors (they are logged: the first of a run of failures at WARNING, the
    rest at DEBUG). Returns after the unregister attempt (at most UNREGISTER_TIMEOUT_S).
    """
    if not interval > 0:
        raise ValueError(f"the heartbeat interval must be > 0 seconds, got {interval}")
    router_url = router_url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body: dict[str, object] = {"url": self_url, "role": role, "interval": interval}
    is_failing, is_registered = False, False
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            error = await _post(session, f"{router_url}/register", body, headers, timeout_s=max(interval, 1.0))
            if error is not None:
                logger.log(
                    logging.DEBUG if is_failing else logging.WARNING,
                    "cannot register %s with the router %s (%s); retrying every %g s",
                    self_url,
                    router_url,
                    error,
                    interval,
                )
            else:
                logger.log(
                    logging.DEBUG if is_registered and not is_failing else logging.INFO,
                    "registered %s as %s with the router %s",
                    self_url,
                    role,
                    router_url,
                )
                is_registered = True
            is_failing = error is not None
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
        error = await _post(session, f"{router_url}/unregister", {"url": self_url}, headers, UNREGISTER_TIMEOUT_S)
        if error is not None:
            logger.warning(
                "cannot unregister %s from the router %s (%s); it drops it after missed heartbeats",
                self_url,
                router_url,
                error,
            )
        else:
            logger.info("unregistered %s from %s", self_url, router_url)


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
