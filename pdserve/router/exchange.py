"""One client request on its route (`Exchange`): P's half, the primary's response, the client, the deadline; and
the router's settings, errors and shared state that an exchange needs.

A PD request goes to P (stream forced off) and D (the client's stream value) at once, with the same room and each
side's peer set to the other; D's answer is the client's. P's failure before D finishes aborts D; a client
disconnect aborts both; closing an upstream connection is how an instance learns of an abort. This module knows
nothing about models or tokens: bodies pass through.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive

from pdserve.http.limits import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_STALL_TIMEOUT_S
from pdserve.router.metrics import RouterMetrics
from pdserve.router.policies import Route, RouterPolicy
from pdserve.router.registry import Instance, Registry

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class RouterSettings:
    request_timeout_s: float = 600.0  # arrival to last byte; past it: 504 (or an SSE error once streaming)
    api_key: str | None = None  # required from clients and sent to instances when set
    connect_timeout_s: float = 10.0  # to open a connection to an instance
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # a larger body is a 413 before it is read
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S  # an instance silent this long on a request has stalled it
    max_migrations: int = 2  # times one request may move to another instance after a stall or a death
    cluster_secret: str | None = None  # required on /register and sent to instances' control routes when set

    def __post_init__(self) -> None:
        if self.max_request_bytes < 1:
            raise ValueError(f"--max-request-bytes must be >= 1, got {self.max_request_bytes}")
        if not self.stall_timeout_s > 0:
            raise ValueError(f"--stall-timeout must be > 0 seconds, got {self.stall_timeout_s}")
        if self.max_migrations < 0:
            raise ValueError(f"--max-migrations must be >= 0, got {self.max_migrations}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"--request-timeout must be > 0 seconds, got {self.request_timeout_s}")
        if not self.connect_timeout_s > 0:
            raise ValueError(f"connect_timeout_s must be > 0 seconds, got {self.connect_timeout_s}")


class Failure(Exception):
    """An error answer for the client: an instance's own (passed through unchanged) or the router's."""

    def __init__(self, status: int, error: dict[str, Any], instance: str, body: bytes | None = None) -> None:
        super().__init__(error.get("message", ""))
        self.status = status
        self.error = error  # {"message", "type", "code"}
        self.instance = instance  # URL of the instance it is blamed on, or NO_INSTANCE
        self.body = body if body is not None else json.dumps({"error": error}).encode()

    @classmethod
    def make(cls, status: int, message: str, code: str, instance: str, type_: str = "server_error") -> Failure:
        return cls(status, {"message": message, "type": type_, "code": code}, instance)

    @classmethod
    def answer(cls, inst: Instance, status: int, data: bytes) -> Failure:
        """An instance's non-2xx answer: its JSON error body unchanged, or one naming the instance if not JSON."""
        try:
            parsed = json.loads(data)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            return cls(status, parsed["error"], inst.url, data)
        text = data[:300].decode(errors="replace")
        return cls.make(
            status, f"{inst.role} instance {inst.url} answered HTTP {status}: {text}", f"http_{status}", inst.url
        )

    @property
    def code(self) -> str:
        return str(self.error.get("code") or f"http_{self.status}")

    def response(self) -> Response:
        return Response(self.body, self.status, media_type="application/json")

    def sse(self) -> bytes:
        return b"data: " + json.dumps({"error": self.error}).encode() + b"\n\ndata: [DONE]\n\n"


class ClientGone(Exception):
    """The client closed its connection."""


@dataclass
class RouterState:
    registry: Registry
    policy: RouterPolicy
    settings: RouterSettings
    metrics: RouterMetrics = field(default_factory=RouterMetrics)
    session: aiohttp.ClientSession | None = None  # one pooled client for every upstream call (set in lifespan)


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class Exchange:
    """One client request on its route: P's task, D's (or the mixed instance's) response, the client, the deadline.

    `close()` is synchronous and idempotent: it cancels P's task and closes an unfinished primary response (which
    aborts the request upstream), so it is safe from a cancelled generator or a done callback.
    """

    def __init__(
        self,
        state: RouterState,
        route: Route,
        path: str,
        body: dict[str, Any],
        headers: dict[str, str],
        receive: Receive,
    ) -> None:
        self.state, self.route, self.path, self.body, self.headers = state, route, path, body, headers
        self.receive = receive
        self.room = uuid.uuid4().hex
        self.is_stream = body.get("stream") is True
        self.started = asyncio.get_running_loop().time()
        self.deadline = self.started + state.settings.request_timeout_s
        self.resp: aiohttp.ClientResponse | None = None
        self.p_task: asyncio.Task[Failure | None] | None = None
        self.watcher: asyncio.Task[None] | None = None
        self.is_complete = False  # the primary's body was read to its end
        self.is_closed = False
        self.outcome = "ok"
        self.primary_body = dict(body)

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        route = self.route
        if route.prefill is not None:
            p = route.prefill
            self.primary_body["kv_transfer_params"] = self._kv_params(peer=p)
            prefill_body = {**self.body, "stream": False, "kv_transfer_params": self._kv_params(peer=route.primary)}
            self._count(p)
            self.p_task = asyncio.create_task(self._prefill(p, prefill_body))
            self.p_task.add_done_callback(lambda _: setattr(p, "num_in_flight", p.num_in_flight - 1))
        self._count(route.primary)
        logger.info(
            "request %s: %s to %s (stream=%s)",
            self.room,
            self.path,
            " + ".join(f"{i.role} {i.url}" for i in (route.prefill, route.primary) if i),
            self.is_stream,
        )
        self.watcher = asyncio.create_task(_wait_disconnect(self.receive))
        self.watcher.add_done_callback(self._on_watcher_done)

    def _kv_params(self, peer: Instance) -> dict[str, Any]:
        return {
            "room": self.room,
            "peer": peer.control_address,
            "peer_incarnation": peer.incarnation,
            "mode": self.route.mode,
        }

    def _count(self, inst: Instance) -> None:
        inst.num_in_flight += 1
        inst.num_requests += 1
        self.state.metrics.count_request(inst)

    def close(self) -> None:
        if self.is_closed:
            return
        self.is_closed = True
        for task in (self.p_task, self.watcher):
            if task is not None and not task.done():
                task.cancel()
        if self.resp is not None:
            if self.is_complete:
                self.resp.release()
            else:
                self.resp.close()
        self.route.primary.num_in_flight -= 1
        seconds = asyncio.get_running_loop().time() - self.started
        self.state.metrics.observe_seconds(seconds)
        logger.info("request %s: %s after %.3f s", self.room, self.outcome, seconds)

    def _on_watcher_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is None and not self.is_closed:
            self.outcome = "client disconnected; upstream requests closed"
            self.close()

    def fail(self, failure: Failure) -> Failure:
        self.outcome = f"failed with HTTP {failure.status} {failure.code} ({failure.instance})"
        self.state.metrics.count_error(failure.instance, failure.code)
        return failure

    # -- the request --------------------------------------------------------------------------------------------

    async def run(self) -> Response:
        self.start()
        is_streaming = False
        try:
            resp = await self._wait(self._open(self.route.primary, self.primary_body))
            if resp.status >= 300:
                data = await self._wait(self._read(resp.read))
                raise Failure.answer(self.route.primary, resp.status, data)
            headers = {"content-type": resp.headers.get("Content-Type", "application/json")}
            if not self.is_stream:
                data = await self._wait(self._read(resp.read))
                self.is_complete = True
                return Response(data, resp.status, headers=headers)
            first = await self._wait(self._read(resp.content.readany))
            if not first:
                self.is_complete = True
                return Response(b"", resp.status, headers=headers)
            is_streaming = True
            return StreamingResponse(self._stream(first), resp.status, headers={**headers, "cache-control": "no-cache"})
        except Failure as f:
            return self.fail(f).response()
        except ClientGone:
            return Response(status_code=499)  # nobody reads it
        finally:
            if not is_streaming:
                self.close()

    async def _stream(self, first: bytes) -> AsyncIterator[bytes]:
        """D's bytes as they arrive; a failure after the first byte becomes an SSE error event and [DONE]."""
        assert self.resp is not None
        resp = self.resp
        try:
            yield first
            while not self.is_closed:
                try:
                    chunk = await self._wait(self._read(resp.content.readany))
                except Failure as f:
                    self.fail(f)
                    self.close()  # abort D before telling the client
                    yield f.sse()
                    return
                except ClientGone:
                    return
                if not chunk:
                    self.is_complete = True
                    return
                yield chunk
        finally:
            self.close()

    async def _wait(self, coro: Coroutine[Any, Any, T]) -> T:
        """`coro`'s result, unless P fails first (its Failure), the client leaves (ClientGone) or time runs out."""
        assert self.watcher is not None
        task = asyncio.ensure_future(coro)
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._raise_if_prefill_failed()
                waiting: set[asyncio.Future[Any]] = {task, self.watcher}
                if self.p_task is not None and not self.p_task.done():
                    waiting.add(self.p_task)
                remaining = max(0.0, self.deadline - loop.time())
                done, _ = await asyncio.wait(waiting, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                if self.watcher in done:
                    raise ClientGone
                self._raise_if_prefill_failed()
                if task in done:
                    return task.result()
                if not done:
                    raise self._timeout()
        finally:
            if not task.done():
                task.cancel()

    def _raise_if_prefill_failed(self) -> None:
        if self.p_task is not None and self.p_task.done() and not self.p_task.cancelled():
            failure = self.p_task.result()
            # P fails with aborted_by_decode when D gave the request up: D's own answer (503 no_capacity, ...)
            # is the client's, and it comes through the primary
            if failure is not None and failure.code != "aborted_by_decode":
                raise failure

    def _timeout(self) -> Failure:
        primary = self.route.primary
        return Failure.make(
            504,
            f"no complete answer from {primary.role} instance {primary.url} within the "
            f"router's request timeout ({self.state.settings.request_timeout_s:g} s, "
            "--request-timeout)",
            "request_timeout",
            primary.url,
        )

    def _unreachable(self, inst: Instance, e: BaseException) -> Failure:
        reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        self.state.registry.mark_failed(inst, reason)
        return Failure.make(
            502, f"{inst.role} instance {inst.url} is unavailable ({reason})", "instance_unavailable", inst.url
        )

    async def _post(self, inst: Instance, body: dict[str, Any]) -> aiohttp.ClientResponse:
        assert self.state.session is not None
        return await self.state.session.post(
            f"{inst.url}{self.path}", data=json.dumps(body).encode(), headers=self.headers
        )

    async def _open(self, inst: Instance, body: dict[str, Any]) -> aiohttp.ClientResponse:
        try:
            self.resp = await self._post(inst, body)  # kept at once: close() must reach it even if we are cancelled
        except (aiohttp.ClientError, OSError) as e:
            raise self._unreachable(inst, e) from None
        return self.resp

    async def _read(self, read: Callable[[], Awaitable[bytes]]) -> bytes:
        try:
            return await read()
        except (aiohttp.ClientError, OSError) as e:
            raise self._unreachable(self.route.primary, e) from None

    async def _prefill(self, inst: Instance, body: dict[str, Any]) -> Failure | None:
        """P's side: None when it answered 2xx (the body is discarded), else its Failure. Never raises."""
        resp: aiohttp.ClientResponse | None = None
        try:
            resp = await self._post(inst, body)
            data = await resp.read()
            return None if resp.status < 300 else Failure.answer(inst, resp.status, data)
        except (aiohttp.ClientError, OSError) as e:
            return self._unreachable(inst, e)
        finally:
            if resp is not None:
                resp.close()  # a no-op after a complete read; an abort for P otherwise
