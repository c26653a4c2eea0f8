"""One client request across the attempts that serve it (`Exchange`), and the router's settings and shared state.

An attempt (attempt.py) is one route: P and D at once, or a mixed instance. P's failure before D finishes aborts
D; a client disconnect aborts both. An instance that dies or stalls is left: before the client has a byte the
request is retried on a fresh route, mid-stream it migrates (docs/server.md, "Stalls and migration"). This module
knows nothing about models: bodies pass through, and of a stream it reads only the token ids it asked for.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive

from pdserve.http.limits import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_STALL_TIMEOUT_S
from pdserve.router.attempt import Attempt
from pdserve.router.failure import ClientGone, Failure
from pdserve.router.metrics import RouterMetrics
from pdserve.router.policies import Route, RouteError, RouterPolicy, plan_route, request_key, scores_prompt
from pdserve.router.registry import Registry
from pdserve.router.stream import StreamRelay

logger = logging.getLogger(__name__)
T = TypeVar("T")
ROUTER_FIELDS = ("kv_transfer_params", "stream_token_ids", "resume_token_ids")  # request fields the router sets


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
    """One client request, across the attempts that serve it: the client, its deadline, and what to do when an
    instance fails.

    - Before the first byte reaches the client (or for a non-streamed answer), an instance fault (unreachable,
      stalled, its engine dead or stalled) is retried once on a fresh route, which the failed instance is no longer
      on (it is marked unhealthy).
    - Mid-stream, the request migrates: it goes to a fresh route with `resume_token_ids`, the completion so far, and
      the new instance's stream continues the client's (greedy: the same text as an uninterrupted run; seeded: the
      same sequence). At most `max_migrations` times; then, or with no instance left, the client gets an error event
      and the stream ends.
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
        self.state, self.path, self.headers, self.receive = state, path, headers, receive
        self.is_stream = body.get("stream") is True
        prompt = body.get("prompt")
        # a stream resumes one choice's tokens: one with several choices (n > 1, a list of prompts) cannot move
        self.can_migrate = body.get("n", 1) == 1 and not (
            isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt)
        )
        body = {k: v for k, v in body.items() if k not in ROUTER_FIELDS}  # the router's to set, never the client's
        self.body = {**body, "stream_token_ids": True} if self.is_stream else body
        self.started = asyncio.get_running_loop().time()
        self.deadline = self.started + state.settings.request_timeout_s
        self.attempt = Attempt(state, route, path, self.body, headers)
        self.relay = StreamRelay()
        self.watcher: asyncio.Task[None] | None = None
        self.is_streaming = False  # the client has had the response's first bytes
        self.is_closed = False
        self.num_retries = 0
        self.num_migrations = 0
        self.outcome = "ok"

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def close(self) -> None:
        if self.is_closed:
            return
        self.is_closed = True
        if self.watcher is not None and not self.watcher.done():
            self.watcher.cancel()
        self.attempt.close()
        seconds = asyncio.get_running_loop().time() - self.started
        self.state.metrics.observe_seconds(seconds)
        logger.info("request %s: %s after %.3f s", self.attempt.room, self.outcome, seconds)

    def _on_watcher_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is None and not self.is_closed:
            self.outcome = "client disconnected; upstream requests closed"
            self.close()

    def fail(self, failure: Failure) -> Failure:
        self.outcome = f"failed with HTTP {failure.status} {failure.code} ({failure.instance})"
        self.state.metrics.count_error(failure.instance, failure.code)
        return failure

    def _move(self, failure: Failure, body: dict[str, Any]) -> None:
        """A new attempt for `body` on a fresh route (Failure if there is none); the failed one is closed."""
        self.attempt.close()
        logger.warning("request %s: %s; moving it", self.attempt.room, failure.error.get("message"))
        failed = self.state.registry.get(failure.instance)
        if failed is not None and failed.is_healthy:  # it reported its own fault: off the routes until checked
            self.state.registry.mark_failed(failed, str(failure.error.get("message")))
        try:
            route = plan_route(
                self.state.registry.instances(), self.state.policy, request_key(body), scores_prompt(body)
            )
        except RouteError as e:
            raise Failure.make(
                failure.status, f"{failure.error.get('message')}; no other instance can take it over ({e.message})",
                failure.code, failure.instance,
            ) from None  # fmt: skip
        self.attempt = Attempt(self.state, route, self.path, body, self.headers)
        self.attempt.start()

    # -- the request --------------------------------------------------------------------------------------------

    async def run(self) -> Response:
        self.watcher = asyncio.create_task(_wait_disconnect(self.receive))
        self.watcher.add_done_callback(self._on_watcher_done)
        self.attempt.start()
        try:
            while True:
                try:
                    return await self._answer()
                except Failure as f:
                    if not (f.is_instance_fault and self.num_retries < min(1, self.state.settings.max_migrations)):
                        raise
                    self.num_retries += 1
                    self.state.metrics.count_retry()
                    self._move(f, self.body)
        except Failure as f:
            return self.fail(f).response()
        except ClientGone:
            return Response(status_code=499)  # nobody reads it
        finally:
            if not self.is_streaming:
                self.close()

    async def _answer(self) -> Response:
        """The current attempt's answer: a whole body, or a stream once its first bytes came."""
        first = await self._open()
        resp = self.attempt.resp
        assert resp is not None
        headers = {"content-type": resp.headers.get("Content-Type", "application/json")}
        if not self.is_stream:
            self.attempt.is_complete = True
            return Response(first, resp.status, headers=headers)
        if not first:
            self.attempt.is_complete = True
            return Response(b"", resp.status, headers=headers)
        self.is_streaming = True
        return StreamingResponse(self._stream(first), resp.status, headers={**headers, "cache-control": "no-cache"})

    async def _open(self) -> bytes:
        """Open the current attempt: its first relayed bytes (streaming) or its whole body; Failure for an error."""
        attempt = self.attempt
        resp = await self._wait(attempt.open())
        if resp.status >= 300:
            raise Failure.answer(attempt.route.primary, resp.status, await self._wait(attempt.read(resp.read)))
        if not self.is_stream:
            return await self._wait(attempt.read(resp.read))
        self.relay.restart()
        while True:  # to the first bytes worth relaying: a keepalive, or a chunk with more than token ids
            data = await self._wait(attempt.read(resp.content.readany))
            if not data:
                return self._relay_end()
            out = self.relay.feed(data)
            if out:
                return out  # a fault after it is raised at the stream's next read
            self._raise_fault()

    def _raise_fault(self) -> None:
        """The Failure of an instance-fault error event the relay met, if it met one."""
        if self.relay.fault is not None:
            error, self.relay.fault = self.relay.fault, None
            raise Failure(502, error, self.attempt.route.primary.url)

    def _relay_end(self) -> bytes:
        """The primary's stream ended: fine after [DONE]; otherwise it died mid-answer."""
        if self.relay.is_done:
            self.attempt.is_complete = True
            return b""
        primary = self.attempt.route.primary
        self.state.registry.mark_failed(primary, "it ended a stream before [DONE]")
        raise Failure.make(
            502,
            f"{primary.role} instance {primary.url} closed the stream before its end",
            "instance_unavailable",
            primary.url,
        )

    async def _stream(self, first: bytes) -> AsyncIterator[bytes]:
        """The client's stream: the primary's relayed events; after an instance fault, the next attempt's (a
        migration); a failure that cannot move becomes an SSE error event and [DONE]."""
        try:
            yield first
            while not self.is_closed and not self.relay.is_done:
                try:
                    self._raise_fault()
                    data = await self._wait(self.attempt.read(self.attempt.resp.content.readany))  # type: ignore[union-attr]
                    out = self.relay.feed(data) if data else self._relay_end()
                    if not out:
                        self._raise_fault()
                except Failure as f:
                    try:
                        out = await self._migrate(f)
                    except ClientGone:
                        return
                    except Failure as final:
                        self.fail(final)
                        self.close()  # abort upstream before telling the client
                        yield final.sse()
                        return
                except ClientGone:
                    return
                if out:
                    yield out
            self.attempt.is_complete = self.relay.is_done
        finally:
            self.close()

    async def _migrate(self, failure: Failure) -> bytes:
        """Move the stream to a fresh route, resuming after the tokens the client has; its first relayed bytes.
        Raises the Failure to report when the request cannot move (or fails again past --max-migrations)."""
        while True:
            if (
                not failure.is_instance_fault
                or not self.can_migrate
                or self.num_migrations >= self.state.settings.max_migrations
            ):
                raise failure
            self.num_migrations += 1
            self.state.metrics.count_migration("stalled" if failure.code.endswith("stalled") else "failed")
            body = {**self.body, "resume_token_ids": list(self.relay.token_ids)}
            self._move(failure, body)
            logger.info("request %s: resumed after %d tokens", self.attempt.room, len(self.relay.token_ids))
            try:
                return await self._open()
            except Failure as again:
                failure = again

    async def _wait(self, coro: Coroutine[Any, Any, T]) -> T:
        """`coro`'s result, unless P fails first (its Failure), the attempt stalls (Failure), the client leaves
        (ClientGone) or time runs out (Failure)."""
        assert self.watcher is not None
        task = asyncio.ensure_future(coro)
        loop = asyncio.get_running_loop()
        settings = self.state.settings
        try:
            while True:
                self._raise_if_prefill_failed()
                waiting: set[asyncio.Future[Any]] = {task, self.watcher}
                p_task = self.attempt.p_task
                if p_task is not None and not p_task.done():
                    waiting.add(p_task)
                remaining = self.deadline - loop.time()
                if remaining <= 0:
                    raise self._timeout()
                timeout = min(remaining, settings.stall_timeout_s / 4)
                done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if self.watcher in done:
                    raise ClientGone
                self._raise_if_prefill_failed()
                if task in done:
                    return task.result()
                stall = self.attempt.stall(loop.time(), settings.stall_timeout_s, self.is_streaming)
                if stall is not None:
                    raise stall
        finally:
            if not task.done():
                task.cancel()

    def _raise_if_prefill_failed(self) -> None:
        failure = self.attempt.prefill_failure()
        if failure is not None:
            raise failure

    def _timeout(self) -> Failure:
        primary = self.attempt.route.primary
        return Failure.make(
            504,
            f"no complete answer from {primary.role} instance {primary.url} within the "
            f"router's request timeout ({self.state.settings.request_timeout_s:g} s, "
            "--request-timeout)",
            "request_timeout",
            primary.url,
        )
