"""The API server's FastAPI app: OpenAI endpoints, /health, /metrics and /v1/pd/info.

The error shape, the generic error handlers and the API-key check are pdserve.http's (shared with the router);
this module adds the engine client's errors. Request bodies become engine requests in prepare.py, engine deltas
become text in serving.py, and responses.py writes the OpenAI answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from pdserve.engine.async_client import AsyncEngineClient, EngineDeadError, RequestRejected
from pdserve.http.auth import require_api_key
from pdserve.http.errors import add_error_handlers, error_response
from pdserve.http.json_body import JsonBodyRoute
from pdserve.http.limits import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_STALL_TIMEOUT_S, RequestSizeLimit
from pdserve.server.metrics import Metrics
from pdserve.server.prepare import Preparer
from pdserve.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from pdserve.server.responses import rejection, respond
from pdserve.server.serving import Serving

T = TypeVar("T")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_queue_len: int = 256
    role: str = "mixed"
    kv_transfer: str = "direct"
    register_with: str | None = None  # a router URL to join with heartbeats
    public_url: str | None = None  # this server's URL as the router should reach it
    heartbeat_interval: float = 2.0
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # a larger body is a 413 before it is read
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S  # an engine core silent this long has stalled
    # tokenizing and chat templating run here, off the event loop; one by default: an HF fast tokenizer that two
    # threads call while one changes its truncation settings raises 'Already borrowed'
    num_tokenizer_threads: int = 1
    tool_call_parser: str = "hermes"  # server.tools; "none": tools are refused

    @property
    def keepalive_s(self) -> float:
        """How long a stream may go without a byte: an SSE comment is sent then, so the router can tell a quiet
        stream (a long prefill, a preempted request) from a hung instance."""
        return self.stall_timeout_s / 4


def build_app(client: AsyncEngineClient, tokenizer: Any, settings: ServerSettings) -> FastAPI:
    """The API server's app. Its lifespan starts the engine client and, with --register-with, the heartbeat."""
    metrics = Metrics()
    max_open = client.config.scheduler.max_num_seqs + settings.max_queue_len
    preparer = Preparer(
        client,
        tokenizer,
        settings.model_name,
        max_open,
        settings.role,
        settings.kv_transfer,
        settings.num_tokenizer_threads,
        settings.tool_call_parser,
    )
    serving = Serving(client, tokenizer, metrics, settings.model_name)
    app = FastAPI(title="pdserve", version="0.1.0", lifespan=_lifespan(client, settings))
    app.router.route_class = JsonBodyRoute  # JSON bodies through parse_json_body: depth, NaN, UTF-8 are a 400
    app.add_middleware(RequestSizeLimit, max_bytes=settings.max_request_bytes)  # 413, before the body is read
    add_error_handlers(app, logger, "server")
    _add_engine_error_handlers(app)
    _add_control_routes(app, client, settings, metrics)
    _add_openai_routes(app, preparer, serving, settings, [Depends(require_api_key(settings.api_key))])
    return app


def _lifespan(
    client: AsyncEngineClient, settings: ServerSettings
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client.start()
        stop = asyncio.Event()
        beat = None
        if settings.register_with and settings.public_url:
            from pdserve.server.heartbeat import heartbeat

            beat = asyncio.create_task(
                heartbeat(
                    settings.register_with,
                    settings.public_url,
                    settings.role,
                    settings.heartbeat_interval,
                    stop,
                    api_key=settings.api_key,  # a router with --api-key takes registrations made with the same key
                    cluster_secret=client.config.disagg.cluster_secret,
                )
            )
        yield
        stop.set()
        if beat is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(beat, timeout=3)
        await client.shutdown()

    return lifespan


def _add_engine_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestRejected)
    async def _rejected(_: Request, exc: RequestRejected) -> JSONResponse:
        return rejection(exc)

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return error_response(503, f"the engine failed: {exc}", "engine_dead", "server_error")


def _add_control_routes(app: FastAPI, client: AsyncEngineClient, settings: ServerSettings, metrics: Metrics) -> None:
    @app.get("/live")
    async def live() -> Response:
        """200 whenever this API process answers at all: liveness, kept apart from /health (readiness and the
        engine core's progress). A process that stops answering this is hung; one whose /health is 503 is not."""
        return JSONResponse({"status": "ok"})

    @app.get("/health")
    async def health() -> Response:
        """200 while the engine core lives and makes progress (it steps, or idles by choice); 503 while it loads,
        after it failed, and while it is stalled (docs/server.md). Never waits on the tokenizer or the engine."""
        if client.is_healthy:
            return JSONResponse({"status": "ok"})
        if client.failure:
            status = "failed: " + client.failure
        elif client.stall:
            status = "stalled: " + client.stall
        else:
            status = "loading"
        return JSONResponse({"status": status}, status_code=503)

    @app.get("/v1/pd/info")
    async def pd_info() -> Response:
        """What a router needs to pair this instance (docs/disaggregation.md)."""
        info = client.info
        if info is None or not client.is_healthy:
            return error_response(503, "the engine is not ready", "model_loading", "server_error")
        stats = client.stats
        return JSONResponse(
            {
                "role": settings.role,
                "incarnation": info.incarnation,
                "control_address": info.control_address,
                "fingerprint": info.fingerprint,
                "model": settings.model_name,
                "tp_size": info.tp_size,
                "kv_transfer": settings.kv_transfer,
                "num_open_requests": client.num_open_requests,
                "num_blocks_free": stats.num_blocks_free,
                "num_blocks_total": stats.num_blocks_total,
                "block_size": info.block_size,
                "max_model_len": info.max_model_len,
            }
        )

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(client.stats), media_type="text/plain; version=0.0.4")


def _add_openai_routes(
    app: FastAPI, preparer: Preparer, serving: Serving, settings: ServerSettings, auth: list[Any]
) -> None:
    client = serving.client

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": settings.model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "pdserve",
                    "max_model_len": client.info and client.info.max_model_len,
                }
            ],
        }

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        choices = await preparer.prepare_completion(body)
        return await respond(serving, choices, body, request, settings.keepalive_s, is_chat=False)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        choices = await preparer.prepare_chat(body)
        return await respond(serving, choices, body, request, settings.keepalive_s, is_chat=True)

    @app.post("/v1/tokenize", dependencies=auth)
    @app.post("/tokenize", dependencies=auth)
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        return await preparer.tokenize(body)

    @app.post("/v1/detokenize", dependencies=auth)
    @app.post("/detokenize", dependencies=auth)
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        return await preparer.detokenize(body)
