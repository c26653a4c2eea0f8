"""One try of a request on one route (`Attempt`): P's half, a task that reads P's whole answer, and the primary's
response (D's, or a mixed instance's), with the time of the last byte either sent.

A PD attempt goes to P (stream forced off) and D (the client's stream value) at once, with the same room and each
side's peer set to the other. `close()` aborts whatever is unfinished upstream (closing an upstream connection is
how an instance learns of an abort). `stall()` says whether the attempt's instances have stopped answering. What to
do about a failure (retry, migrate, give up) is the Exchange's (exchange.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import aiohttp

from pdserve.router.failure import Failure
from pdserve.router.policies import Route
from pdserve.router.registry import Instance

if TYPE_CHECKING:
    from pdserve.router.exchange import RouterState

logger = logging.getLogger(__name__)


class Attempt:
    """`close()` is synchronous and idempotent: safe from a cancelled generator or a done callback."""

    def __init__(self, state: RouterState, route: Route, path: str, body: dict[str, Any], headers: dict[str, str]):
        self.state, self.route, self.path, self.headers = state, route, path, headers
        self.room = uuid.uuid4().hex
        self.primary_body = dict(body)
        self.prefill_body: dict[str, Any] | None = None
        if route.prefill is not None:
            self.primary_body["kv_transfer_params"] = self._kv_params(peer=route.prefill)
            self.prefill_body = {**body, "stream": False, "kv_transfer_params": self._kv_params(peer=route.primary)}
            self.prefill_body.pop("stream_token_ids", None)
        self.resp: aiohttp.ClientResponse | None = None
        self.p_task: asyncio.Task[Failure | None] | None = None
        self.is_complete = False  # the primary's body was read to its end
        self.is_closed = False
        self.last_byte_at = asyncio.get_running_loop().time()  # the start, then the primary's last bytes

    def _kv_params(self, peer: Instance) -> dict[str, Any]:
        return {
            "room": self.room,
            "peer": peer.control_address,
            "peer_incarnation": peer.incarnation,
            "mode": self.route.mode,
        }

    def start(self) -> None:
        route = self.route
        if route.prefill is not None and self.prefill_body is not None:
            p = route.prefill
            self._count(p)
            self.p_task = asyncio.create_task(self._prefill(p, self.prefill_body))
            self.p_task.add_done_callback(lambda _: setattr(p, "num_in_flight", p.num_in_flight - 1))
        self._count(route.primary)
        logger.info(
            "request %s: %s to %s (stream=%s)",
            self.room,
            self.path,
            " + ".join(f"{i.role} {i.url}" for i in (route.prefill, route.primary) if i),
            self.primary_body.get("stream") is True,
        )

    def _count(self, inst: Instance) -> None:
        inst.num_in_flight += 1
        inst.num_requests += 1
        self.state.metrics.count_request(inst)

    def close(self) -> None:
        if self.is_closed:
            return
        self.is_closed = True
        if self.p_task is not None and not self.p_task.done():
            self.p_task.cancel()
        if self.resp is not None:
            if self.is_complete:
                self.resp.release()
            else:
                self.resp.close()
        self.route.primary.num_in_flight -= 1

    # -- upstream calls -------------------------------------------------------------------------------------------

    async def open(self) -> aiohttp.ClientResponse:
        """The primary's response (its status and headers); Failure if it cannot be reached."""
        try:
            self.resp = await self._post(self.route.primary, self.primary_body)  # kept at once: close() reaches it
        except (aiohttp.ClientError, OSError) as e:
            raise self._unreachable(self.route.primary, e) from None
        self.last_byte_at = asyncio.get_running_loop().time()
        return self.resp

    async def read(self, read: Callable[[], Awaitable[bytes]]) -> bytes:
        """The primary's next bytes through `read`; Failure if the connection breaks."""
        try:
            data = await read()
        except (aiohttp.ClientError, OSError) as e:
            raise self._unreachable(self.route.primary, e) from None
        self.last_byte_at = asyncio.get_running_loop().time()
        return data

    async def _post(self, inst: Instance, body: dict[str, Any]) -> aiohttp.ClientResponse:
        assert self.state.session is not None
        return await self.state.session.post(
            f"{inst.url}{self.path}", data=json.dumps(body).encode(), headers=self.headers
        )

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

    def _unreachable(self, inst: Instance, e: BaseException) -> Failure:
        reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        self.state.registry.mark_failed(inst, reason)
        return Failure.make(
            502, f"{inst.role} instance {inst.url} is unavailable ({reason})", "instance_unavailable", inst.url
        )

    # -- what went wrong ------------------------------------------------------------------------------------------

    def prefill_failure(self) -> Failure | None:
        """P's failure, once its task has ended with one. P fails with aborted_by_decode when D gave the request
        up: D's own answer (503 no_capacity, ...) is the client's, and it comes through the primary."""
        if self.p_task is None or not self.p_task.done() or self.p_task.cancelled():
            return None
        failure = self.p_task.result()
        return None if failure is None or failure.code == "aborted_by_decode" else failure

    def stall(self, now: float, timeout_s: float, is_streaming: bool) -> Failure | None:
        """The attempt's stall, if it has one. Streaming, the primary sends at least a keepalive every quarter of
        the stall timeout: silence for `timeout_s` is a stall. Before the first byte, or not streaming, silence is
        normal (a queue, a long generation): it is a stall only while one of the attempt's instances (the primary,
        or P until it answered) has failed its health checks for half the timeout without a break."""
        silent_s = now - self.last_byte_at
        if silent_s < timeout_s:
            return None
        primary = self.route.primary
        if is_streaming:
            return self._stalled(primary, f"sent nothing for {silent_s:.1f} s")
        waiting_on = [primary]
        if self.route.prefill is not None and self.p_task is not None and not self.p_task.done():
            waiting_on.append(self.route.prefill)
        for inst in waiting_on:
            if inst.unhealthy_for(now) >= timeout_s / 2:
                return self._stalled(inst, f"has failed its health checks for {inst.unhealthy_for(now):.1f} s")
        return None

    def _stalled(self, inst: Instance, what: str) -> Failure:
        self.state.registry.mark_failed(inst, f"stalled a request: {what}")
        return Failure.make(
            504,
            f"{inst.role} instance {inst.url} {what} (--stall-timeout {self.state.settings.stall_timeout_s:g})",
            "instance_stalled",
            inst.url,
        )
