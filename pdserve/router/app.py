"""The router's HTTP front door: OpenAI endpoints proxied to a P/D pair or a mixed instance, plus /health,
/metrics, /register and /unregister. One request's journey through its instances is exchange.py's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from pdserve.http.auth import require_api_key
from pdserve.http.errors import ApiError, add_error_handlers
from pdserve.http.limits import RequestSizeLimit, parse_json_body
from pdserve.router.exchange import Exchange, Failure, RouterSettings, RouterState
from pdserve.router.membership import add_membership_routes
from pdserve.router.metrics import NO_INSTANCE
from pdserve.router.policies import RouteError, RouterPolicy, plan_route, request_key, scores_prompt
from pdserve.router.registry import Registry
from pdserve.router.shape import body_shape_problem

logger = logging.getLogger(__name__)
__all__ = ["RouterSettings", "build_router_app"]


def _parse_body(raw: bytes, path: str) -> dict[str, Any]:
    """The client's body, checked once before it goes to any instance: JSON that parse_json_body accepts (UTF-8,
    nesting depth, finite numbers), an object, and the OpenAI shape of `path` (shape.py). Failure 400 if not."""
    try:
        body = parse_json_body(raw)
    except ApiError as e:
        problem: str | None = e.message
    else:
        problem = body_shape_problem(body, path)
    if problem is not None:
        raise Failure.make(400, problem, "invalid_request", NO_INSTANCE, "invalid_request_error")
    body.pop("kv_transfer_params", None)  # the router's to set, never the client's
    return body


def _upstream_headers(settings: RouterSettings, request: Request) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    auth = f"Bearer {settings.api_key}" if settings.api_key else request.headers.get("authorization")
    if auth:
        headers["Authorization"] = auth
    return headers


def _is_serving(registry: Registry) -> bool:
    return bool(registry.healthy("prefill") and registry.healthy("decode")) or bool(registry.healthy("mixed"))


def build_router_app(registry: Registry, policy: RouterPolicy, settings: RouterSettings) -> FastAPI:
    """The router app. Its lifespan opens the shared HTTP client and runs the registry's health loop."""
    state = RouterState(registry, policy, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout_s)
        state.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout)
        await registry.start(state.session)
        try:
            yield
        finally:
            await registry.stop()
            await state.session.close()

    app = FastAPI(title="pdserve router", version="0.1.0", lifespan=lifespan)
    app.state.router = state
    app.add_middleware(RequestSizeLimit, max_bytes=settings.max_request_bytes)  # 413, before the body is read
    add_error_handlers(app, logger, "router")
    auth = [Depends(require_api_key(settings.api_key))]
    _add_openai_routes(app, state, auth)
    _add_control_routes(app, state, auth)
    return app


def _add_openai_routes(app: FastAPI, state: RouterState, auth: list[Any]) -> None:
    async def proxy(request: Request, path: str) -> Response:
        try:
            body = _parse_body(await request.body(), path)
            route = plan_route(state.registry.instances(), state.policy, request_key(body), scores_prompt(body))
        except (Failure, RouteError) as e:
            failure = e if isinstance(e, Failure) else Failure.make(e.status, e.message, e.code, NO_INSTANCE)
            state.metrics.count_error(failure.instance, failure.code)
            state.metrics.observe_seconds(0.0)
            logger.warning("request refused: %s", failure.error["message"])
            return failure.response()
        headers = _upstream_headers(state.settings, request)
        return await Exchange(state, route, path, body, headers, request.receive).run()

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request) -> Response:
        return await proxy(request, "/v1/completions")

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(request: Request) -> Response:
        return await proxy(request, "/v1/chat/completions")

    @app.get("/v1/models", dependencies=auth)
    async def models(request: Request) -> Response:
        return await _proxy_to_any(state, _upstream_headers(state.settings, request))

    @app.post("/v1/tokenize", dependencies=auth)
    async def tokenize(request: Request) -> Response:
        return await _proxy_to_any(state, _upstream_headers(state.settings, request), "/v1/tokenize", request)

    @app.post("/v1/detokenize", dependencies=auth)
    async def detokenize(request: Request) -> Response:
        return await _proxy_to_any(state, _upstream_headers(state.settings, request), "/v1/detokenize", request)


def _add_control_routes(app: FastAPI, state: RouterState, auth: list[Any]) -> None:
    registry = state.registry

    @app.get("/health")
    async def health() -> Response:
        ok = _is_serving(registry)
        return JSONResponse(
            {"status": "ok" if ok else "unavailable", "instances": [i.describe() for i in registry.instances()]},
            200 if ok else 503,
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(registry.instances()), media_type="text/plain; version=0.0.4")

    add_membership_routes(app, registry, auth)


async def _proxy_to_any(
    state: RouterState, headers: dict[str, str], path: str = "/v1/models", request: Request | None = None
) -> Response:
    """GET /v1/models (or POST `request`'s body to `path`: the tokenizer endpoints) of one healthy instance
    (mixed, then decode, then prefill): any instance answers them alike."""
    candidates = [i for role in ("mixed", "decode", "prefill") for i in state.registry.healthy(role)]
    if not candidates:
        return Failure.make(
            503, "no healthy instance to list models from", "instance_unavailable", NO_INSTANCE
        ).response()
    inst = candidates[0]
    assert state.session is not None
    timeout = aiohttp.ClientTimeout(total=state.registry.health.timeout_s * 5)
    try:
        if request is None:
            call = state.session.get(f"{inst.url}{path}", headers=headers, timeout=timeout)
        else:
            call = state.session.post(  # the instance checks the body
                f"{inst.url}{path}",
                data=await request.body(),
                headers={**headers, "content-type": "application/json"},
                timeout=timeout,
            )
        async with call as resp:
            data = await resp.read()
            return Response(data, resp.status, media_type=resp.headers.get("Content-Type", "application/json"))
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        state.registry.mark_failed(inst, f"{type(e).__name__}: {e}")
        return Failure.make(
            502,
            f"{inst.role} instance {inst.url} is unavailable ({type(e).__name__})",
            "instance_unavailable",
            inst.url,
        ).response()
