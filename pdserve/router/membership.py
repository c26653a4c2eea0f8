"""The router's side of membership: POST /register (join, or heartbeat when repeated) and POST /unregister.

An instance started with `pdserve serve --register-with ROUTER_URL` sends
/register {"url", "role", "interval"} every interval and /unregister {"url"}
on a clean stop (its side: pdserve/server/heartbeat.py); the registry drops an
instance whose heartbeats stopped (after `num_missed_heartbeats`). This module
turns bodies into registry calls and errors into 400/404 answers; the registry
owns membership and health.

Who may change membership: with a cluster secret (`pdserve router --cluster-secret`), only a request whose
X-PDServe-Cluster-Secret header carries it; without one, only a peer on loopback (this host). Anything else is
a 403, so a router reachable from other hosts takes registrations from them only with a secret
(docs/security.md).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from pdserve.http.auth import SECRET_HEADER
from pdserve.http.errors import ApiError
from pdserve.router.registry import Registry


def add_membership_routes(
    app: FastAPI, registry: Registry, dependencies: list[Any], cluster_secret: str | None = None
) -> None:
    """POST /register (join, or heartbeat when repeated) and POST /unregister on the router's app, behind
    `dependencies` and the cluster-secret check. `cluster_secret` None: the router settings' own
    (app.state.router.settings.cluster_secret), if any."""
    secret = cluster_secret or _settings_secret(app)
    dependencies = [*dependencies, Depends(require_cluster_secret(secret))]

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


def require_cluster_secret(secret: str | None) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency: raises ApiError 403 unless the request carries `secret` in SECRET_HEADER
    (compared in constant time) or, with `secret` None, comes from a loopback address."""

    async def check_cluster_secret(request: Request) -> None:
        if secret is None:
            peer = request.client.host if request.client else None
            if not _is_loopback(peer):
                raise ApiError(
                    403,
                    f"this router takes /register and /unregister from other hosts ({peer}) only with a cluster "
                    "secret; start it with --cluster-secret (or PDSERVE_CLUSTER_SECRET) and the instances with "
                    "the same one",
                    "forbidden",
                    "permission_error",
                )
            return
        given = request.headers.get(SECRET_HEADER, "")
        if not hmac.compare_digest(given.encode(), secret.encode()):
            what = "a wrong" if given else "no"
            raise ApiError(
                403,
                f"{what} cluster secret in the {SECRET_HEADER} header; start the instance with the router's "
                "--cluster-secret (or PDSERVE_CLUSTER_SECRET)",
                "invalid_cluster_secret",
                "permission_error",
            )

    return check_cluster_secret


def _is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return (mapped or address).is_loopback


def _settings_secret(app: FastAPI) -> str | None:
    """The router's RouterSettings.cluster_secret, where build_router_app put its state on the app."""
    settings = getattr(getattr(app.state, "router", None), "settings", None)
    secret = getattr(settings, "cluster_secret", None)
    return secret if isinstance(secret, str) and secret else None


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
