"""The FastAPI app: OpenAI endpoints, /health, /metrics, auth and error handling."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pdserve.engine.async_client import AsyncEngineClient, EngineDeadError, RequestRejected
from pdserve.server.errors import ApiError, error_response
from pdserve.server.metrics import Metrics
from pdserve.server.protocol import ChatCompletionRequest, CompletionRequest
from pdserve.server.serving import Event, Prepared, Serving, sse, usage

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


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def _rejection(exc: RequestRejected) -> JSONResponse:
    if exc.status >= 500:
        return error_response(exc.status, str(exc), exc.code, "server_error")
    return error_response(exc.status, str(exc), exc.code or "invalid_request")


def build_app(client: AsyncEngineClient, tokenizer: Any, settings: ServerSettings) -> FastAPI:
    metrics = Metrics()
    max_open = client.config.scheduler.max_num_seqs + settings.max_queue_len
    serving = Serving(client, tokenizer, metrics, settings.model_name, max_open, settings.role, settings.kv_transfer)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client.start()
        stop = asyncio.Event()
        beat = None
        if settings.register_with and settings.public_url:
            from pdserve.router.heartbeat import heartbeat

            beat = asyncio.create_task(
                heartbeat(settings.register_with, settings.public_url, settings.role, settings.heartbeat_interval, stop)
            )
        yield
        stop.set()
        if beat is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(beat, timeout=3)
        await client.shutdown()

    app = FastAPI(title="pdserve", version="0.1.0", lifespan=lifespan)

    async def check_auth(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(token.encode(), settings.api_key.encode()):
            raise ApiError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'", "invalid_api_key")

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.code, exc.type)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, _describe_validation(exc), "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), None)

    @app.exception_handler(RequestRejected)
    async def _rejected(_: Request, exc: RequestRejected) -> JSONResponse:
        return _rejection(exc)

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return error_response(503, f"the engine failed: {exc}", "engine_dead", "server_error")

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error")
        return error_response(
            500, f"internal error ({type(exc).__name__}); see the server log", "internal_error", "server_error"
        )

    @app.get("/health")
    async def health() -> Response:
        if client.is_healthy:
            return JSONResponse({"status": "ok"})
        status = "failed: " + client.failure if client.failure else "loading"
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

    @app.get("/v1/models", dependencies=[Depends(check_auth)])
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

    @app.post("/v1/completions", dependencies=[Depends(check_auth)])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _respond(serving.prepare_completion(body), body, request, is_chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(check_auth)])
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        return await _respond(serving.prepare_chat(body), body, request, is_chat=True)

    async def _respond(
        p: Prepared, body: CompletionRequest | ChatCompletionRequest, request: Request, is_chat: bool
    ) -> Response:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream:
            # wait for the first token before answering, so that a failure before it (no capacity, a failed
            # KV transfer) is an HTTP status, not an error event in a 200 stream
            events = serving.events(p)
            try:
                first = await serving.first(events, request)
            except RequestRejected as exc:
                return _rejection(exc)
            return StreamingResponse(_stream(p, first, events, include_usage, is_chat), media_type="text/event-stream")
        collected = await serving.collect(p, request)
        text = "".join(e.text for e in collected)
        choice: dict[str, Any] = {"index": 0, "finish_reason": collected[-1].finish_reason if collected else "abort"}
        if is_chat:
            choice.update(message={"role": "assistant", "content": text}, logprobs=serving.logprobs_chat(collected))
        else:
            choice.update(text=text, logprobs=serving.logprobs_completion(collected))
        return JSONResponse(
            {
                "id": p.req_id,
                "object": "chat.completion" if is_chat else "text_completion",
                "created": int(time.time()),
                "model": settings.model_name,
                "choices": [choice],
                "usage": usage(p, sum(len(e.token_ids) for e in collected)),
            }
        )

    async def _stream(
        p: Prepared, first: Event | None, events: AsyncIterator[Event], include_usage: bool, is_chat: bool
    ) -> AsyncIterator[str]:
        created = int(time.time())
        head = {
            "id": p.req_id,
            "object": "chat.completion.chunk" if is_chat else "text_completion",
            "created": created,
            "model": settings.model_name,
        }

        def chunk(e: Event) -> dict[str, Any]:
            if is_chat:
                choice = {
                    "index": 0,
                    "delta": {"content": e.text} if e.text else {},
                    "finish_reason": e.finish_reason,
                    "logprobs": serving.logprobs_chat([e]),
                }
            else:
                choice = {
                    "index": 0,
                    "text": e.text,
                    "finish_reason": e.finish_reason,
                    "logprobs": serving.logprobs_completion([e]),
                }
            return {**head, "choices": [choice]}

        num_out = 0
        if is_chat:
            yield sse(
                {
                    **head,
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "finish_reason": None,
                            "logprobs": None,
                        }
                    ],
                }
            )
        try:
            async with contextlib.aclosing(events):  # type: ignore[type-var]
                if first is not None:
                    num_out += len(first.token_ids)
                    if first.text or first.finish_reason or first.logprobs:
                        yield sse(chunk(first))
                async for e in events:
                    num_out += len(e.token_ids)
                    if e.text or e.finish_reason or e.logprobs:
                        yield sse(chunk(e))
        except RequestRejected as exc:
            yield sse({"error": {"message": str(exc), "type": "server_error", "code": exc.code or "generation_failed"}})
        except EngineDeadError as exc:
            yield sse({"error": {"message": str(exc), "type": "server_error", "code": "engine_dead"}})
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage(p, num_out)})
        yield "data: [DONE]\n\n"

    return app
