"""The API server's handle on its engine core process.

Starts the process, sends requests and aborts, routes token deltas to one
asyncio queue per request, and keeps the latest engine stats. If the engine
process dies, every open request fails at once and `is_healthy` turns False.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import multiprocessing as mp
import os
import shutil
import tempfile
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass

import msgspec
import zmq
import zmq.asyncio

from pdserve.config import EngineConfig
from pdserve.engine.core_proc import CoreProcSpec, core_main
from pdserve.messages import (
    PROTOCOL_VERSION,
    AbortRequest,
    AddRequest,
    EngineFailed,
    EngineOutputs,
    EngineReady,
    EngineStats,
    RequestDelta,
    Shutdown,
    TransferHandle,
    WireSamplingParams,
    decode_from_core,
    encode,
)
from pdserve.native import preload_env

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    pass


class RequestRejected(ValueError):
    """The engine core refused or failed the request; the message says why, status/code how to answer."""

    def __init__(self, message: str, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class EngineStalledError(RequestRejected):
    """The engine core sent nothing for longer than the stall timeout: it is stuck in a step."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 503, "engine_stalled")


@dataclass
class _Stream:
    queue: asyncio.Queue[RequestDelta | Exception]


class AsyncEngineClient:
    """The API server's handle on its engine core process: requests in, token deltas out, and the core's health.

    Health has two parts: liveness (the process runs and has not failed) and progress (it sent something within
    `stall_timeout_s`: it steps, or idles and says so every second). A core that stalls fails the open requests
    with EngineStalledError (503 engine_stalled) and is reported unhealthy until it speaks again.
    """

    def __init__(self, config: EngineConfig, log_level: str = "INFO", stall_timeout_s: float | None = None) -> None:
        if stall_timeout_s is not None and not stall_timeout_s > 0:
            raise ValueError(f"--stall-timeout must be > 0 seconds, got {stall_timeout_s}")
        self.config = config
        self.log_level = log_level
        self.stall_timeout_s = stall_timeout_s  # None: no stall detection
        self.stall: str | None = None  # why the engine core counts as stalled now
        self._last_heard = 0.0  # monotonic time of its last message
        self.info: EngineReady | None = None
        self.failure: str | None = None
        self.stats = EngineStats()
        self._streams: dict[str, _Stream] = {}
        self._dir = tempfile.mkdtemp(prefix="pdserve-api-")
        self._ctx = zmq.asyncio.Context()
        self._to_core = self._ctx.socket(zmq.PUSH)
        self._to_core.bind(f"ipc://{self._dir}/to-core")
        self._from_core = self._ctx.socket(zmq.PULL)
        self._from_core.bind(f"ipc://{self._dir}/from-core")
        self._proc: mp.process.BaseProcess | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.start_failure: str | None = None  # why the engine core failed before it was ever ready
        self.on_start_failure: Callable[[str], None] | None = None  # e.g. stop the HTTP server

    # ---- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Spawn the engine core (it loads the model in the background) and start listening."""
        spec = CoreProcSpec(
            self.config, f"ipc://{self._dir}/to-core", f"ipc://{self._dir}/from-core", os.getpid(), self.log_level
        )
        # not a daemon: the engine core starts tensor-parallel workers of its own
        self._proc = mp.get_context("spawn").Process(
            target=core_main, args=(msgspec.json.encode(spec),), name="pdserve-engine-core"
        )
        with _child_environ(_core_env(self.config)):
            self._proc.start()
        self._tasks = [asyncio.create_task(self._read_outputs()), asyncio.create_task(self._watch_process())]
        if self.stall_timeout_s is not None:
            self._tasks.append(asyncio.create_task(self._watch_progress(self.stall_timeout_s)))

    async def shutdown(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            with contextlib.suppress(zmq.ZMQError, asyncio.TimeoutError):
                await asyncio.wait_for(self._to_core.send(encode(Shutdown())), timeout=2)
        if self._proc is not None:
            await asyncio.to_thread(self._proc.join, 15)
            if self._proc.is_alive():
                self._proc.kill()
        for task in self._tasks:
            task.cancel()
        self._to_core.close(linger=0)
        self._from_core.close(linger=0)
        self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def is_ready(self) -> bool:
        return self.info is not None and self.failure is None

    @property
    def is_healthy(self) -> bool:
        return self.is_ready and self.stall is None and self._proc is not None and self._proc.is_alive()

    async def _watch_progress(self, timeout_s: float) -> None:
        """Mark the engine core stalled when it has been silent for `timeout_s` (after it was ready)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(0.5, timeout_s / 4))
            silent_s = loop.time() - self._last_heard
            if self.info is None or self.failure is not None or self.stall is not None or silent_s < timeout_s:
                continue
            self.stall = f"the engine core has made no progress for {silent_s:.1f} s (--stall-timeout {timeout_s:g})"
            logger.error("%s; failing its %d open requests", self.stall, len(self._streams))
            for stream in self._streams.values():
                stream.queue.put_nowait(EngineStalledError(self.stall))

    def _heard(self) -> None:
        self._last_heard = asyncio.get_running_loop().time()
        if self.stall is not None:
            logger.warning("the engine core is making progress again (%s)", self.stall)
            self.stall = None

    def _fail_all(self, error: str) -> None:
        self.failure = error
        for stream in self._streams.values():
            stream.queue.put_nowait(EngineDeadError(error))

    async def _watch_process(self) -> None:
        while self._proc is not None and self._proc.is_alive():
            await asyncio.sleep(0.5)
        if self._proc is not None and self.failure is None:
            logger.error("engine core process exited with code %s", self._proc.exitcode)
            self._fail_all(f"the engine core process exited (code {self._proc.exitcode})")

    async def _read_outputs(self) -> None:
        incarnation: str | None = None  # of the engine core that said it is ready
        while True:
            data = await self._from_core.recv()
            self._heard()
            try:
                message = decode_from_core(data)
            except msgspec.DecodeError as e:
                logger.error("dropping an undecodable message from the engine core: %s", e)
                continue
            if message.version != PROTOCOL_VERSION:
                logger.error(
                    "dropping a message of protocol version %d (this server speaks %d)",
                    message.version,
                    PROTOCOL_VERSION,
                )
                continue
            if isinstance(message, EngineReady):
                incarnation = message.incarnation
                self.info = message
            elif incarnation is not None and message.incarnation != incarnation:
                logger.warning("dropping a message from a stale engine core (%s)", message.incarnation)
                continue
            if isinstance(message, EngineReady):
                logger.info(
                    "engine ready: %s, max_model_len %d, %d KV blocks",
                    message.model_name,
                    message.max_model_len,
                    message.num_blocks,
                )
            elif isinstance(message, EngineFailed):
                logger.error("engine core failed: %s", message.error)
                self._fail_all(message.error)
                if self.info is None:
                    self.start_failure = message.error
                    if self.on_start_failure is not None:
                        self.on_start_failure(message.error)
            elif isinstance(message, EngineOutputs):
                self.stats = message.stats
                for delta in message.deltas:
                    stream = self._streams.get(delta.req_id)
                    if stream is not None:
                        stream.queue.put_nowait(delta)

    # ---- requests ----------------------------------------------------------------

    @property
    def num_open_requests(self) -> int:
        return len(self._streams)

    async def generate(
        self,
        req_id: str,
        prompt_token_ids: list[int],
        sampling: WireSamplingParams,
        transfer: TransferHandle | None = None,
        idle_s: float | None = None,
        after: str | None = None,
    ) -> AsyncGenerator[RequestDelta | None, None]:
        """Yield deltas until the request finishes, and a None whenever `idle_s` passes without one (a stream's cue
        for a keepalive). Leaving the loop early aborts the request. `after`: a sibling choice (AddRequest.after)."""
        if self.failure is not None:
            raise EngineDeadError(self.failure)
        if self.stall is not None:
            raise EngineStalledError(self.stall)
        stream = _Stream(asyncio.Queue())
        self._streams[req_id] = stream
        finished = False
        try:
            await self._to_core.send(
                encode(
                    AddRequest(
                        req_id=req_id,
                        prompt_token_ids=prompt_token_ids,
                        sampling=sampling,
                        transfer=transfer,
                        after=after,
                    )
                )
            )
            while not finished:
                try:
                    item = await asyncio.wait_for(stream.queue.get(), idle_s)  # a cancelled get() takes no item
                except asyncio.TimeoutError:
                    yield None
                    continue
                if isinstance(item, Exception):
                    raise item
                if item.error is not None:
                    finished = True
                    raise RequestRejected(item.error, item.error_status, item.error_code)
                finished = item.finish_reason is not None
                yield item
        finally:
            del self._streams[req_id]
            if not finished and self.failure is None:
                await self.abort(req_id)

    async def abort(self, req_id: str, finish_reason: str = "abort") -> None:
        if self.failure is not None:
            return
        with contextlib.suppress(zmq.ZMQError, asyncio.TimeoutError):
            await asyncio.wait_for(
                self._to_core.send(encode(AbortRequest(req_id=req_id, finish_reason=finish_reason))), timeout=2
            )


def _opens_wildcard_listeners(config: EngineConfig) -> bool:
    """Whether the engine core may open listeners that bind every interface whatever they are told: Mooncake's
    (a PD role's transfer engines, a Mooncake pool) and torch.distributed's rendezvous store (TP > 1)."""
    if config.cache.kv_store == "mooncake" or config.parallel.tensor_parallel_size > 1:
        return True
    return config.disagg.role != "mixed" and config.disagg.transfer_engine in ("auto", "mooncake")


def _core_env(config: EngineConfig) -> dict[str, str] | None:
    """The engine core's environment where it opens wildcard listeners: the bind-address shim preloaded
    (pdserve.native), so they stay on loopback (or PDSERVE_BIND_HOST). None: this process's, unchanged."""
    if not _opens_wildcard_listeners(config):
        return None
    if config.parallel.tensor_parallel_size == 1 and importlib.util.find_spec("mooncake") is None:
        return None
    return preload_env()  # raises ShimUnavailable with what to do


@contextlib.contextmanager
def _child_environ(env: dict[str, str] | None) -> Iterator[None]:
    """os.environ is `env` while a spawned child starts (it inherits it), then what it was."""
    if env is None:
        yield
        return
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
