"""Mooncake Store backend: a KV pool shared by every engine process that points at one master.

The master keeps the object index; the bytes live in the memory segments that
the connected clients contribute (`global_segment_size` each), so objects held
by a process vanish with it. Puts and gets are zero-copy: Mooncake reads and
writes the caller's block views, which lie inside the one buffer registered
with `register_buffer`. This module knows nothing about blocks or models.

Mooncake's behaviour (measured with mooncake-transfer-engine 0.3.13, TCP, loopback):
- setup() and close() hold the GIL: while they block, every Python thread waits.
- No master at setup: setup retries for ~90 s (20 tries); a hung master makes
  it block for minutes. So we first check that the master port accepts and that
  the HTTP metadata server answers, and raise StoreError at once if not.
- Master killed (SIGKILL): the next call returns RPC_FAIL (-900) at once; later
  calls block ~4.3 s each, until the client's ping thread marks the master
  unreachable (`health_check() == 2`, 1-13 s after the kill). A master
  restarted on the same address is found again within ~4 s, index empty.
- Master hung (SIGSTOP): every call blocks 30 s (Mooncake's RPC timeout,
  MC_RPC_TIMEOUT_MS) and returns -901.
- Teardown (close, the destructor, or Mooncake's atexit handler for clients
  still open) with the master gone blocks 6-19 s (killed) to 2 min (hung).
- Any call on a closed client, or one whose setup failed, crashes the process.

What this backend does about it:
- Each put/get/exists runs on its own daemon thread (those calls release the
  GIL); the caller waits at most `timeout_s`. A call that overruns, or that
  finds the master unreachable or answering no key, raises StoreError and
  pauses the store for `cooldown_s`: calls in the pause raise at once; the
  first call after it tries the master again.
- A call that overran is not cancelled: until it returns, the store `is_busy`
  and refuses every call, so there are never two C++ calls in flight.
  NOTE: until then an overrun put may still read, and an overrun get may still
  write, the block views it was given (a late answer from a slow master lets
  the transfer go ahead). A caller that reuses those blocks while `is_busy`
  must `wait_idle()` first. Mooncake's RPC timeout bounds the window (30 s).
- close() tears the client down only when the master answers; otherwise it
  leaves it open and returns at once (Mooncake then tears it down at exit).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.error import HTTPError
from urllib.parse import urlsplit
from urllib.request import urlopen

import torch

from pdserve.native import bind_here
from pdserve.store.base import KVStore, StoreError

logger = logging.getLogger(__name__)

_OBJECT_ALREADY_EXISTS = -705
_RPC_FAILURES = frozenset({-900, -901})  # RPC_FAIL, RPC_TIMEOUT: the master did not answer
_MASTER_UNREACHABLE = 2  # health_check(): 0 healthy, 1 closed, 2 master unreachable
_REGISTER_TIMEOUT_S = 30.0  # registering a large buffer (RDMA) takes seconds
MAX_COOLDOWN_S = 60.0
_UNREACHABLE = object()  # a call skipped because the client already knows the master is unreachable
_UNCLOSED: list[Any] = []  # clients close() left open; kept alive so no Python thread runs their teardown


class _Call:
    """One C++ call on a daemon thread, so that the caller can stop waiting for it."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self._fn: Callable[[], Any] | None = fn
        threading.Thread(target=self._run, name="pdserve-mooncake-call", daemon=True).start()

    def _run(self) -> None:
        try:
            assert self._fn is not None
            self.result = self._fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            self.error = e
        finally:
            self._fn = None  # drop the client reference in this thread, not the caller's
            self.done.set()


class MooncakeStore(KVStore):
    def __init__(
        self,
        master: str = "127.0.0.1:50051",
        metadata: str = "http://127.0.0.1:8080/metadata",
        protocol: str = "tcp",
        local_hostname: str = "127.0.0.1",
        global_segment_size: int | str = "256MiB",
        local_buffer_size: int | str = "64MiB",
        device_name: str = "",
        timeout_s: float = 5.0,
        cooldown_s: float = 5.0,
    ) -> None:
        from pdserve.config import parse_size

        try:
            segment_size, buffer_size = parse_size(global_segment_size), parse_size(local_buffer_size)
            self.timeout_s, self.cooldown_s = float(timeout_s), float(cooldown_s)
        except (TypeError, ValueError) as e:
            raise StoreError(f"mooncake store options: {e}") from e
        if protocol not in ("tcp", "rdma"):
            raise StoreError(f"mooncake protocol {protocol!r} is not 'tcp' or 'rdma'")
        if self.timeout_s <= 0 or self.cooldown_s < 0:
            raise StoreError(f"mooncake timeout_s must be > 0 and cooldown_s >= 0, got {timeout_s}, {cooldown_s}")
        self.master = master
        self._lock = threading.Lock()
        self._client: Any = None
        self._overrun: _Call | None = None  # a call that outlived its deadline and has not returned yet
        self._retry_at = 0.0
        self._num_failures = 0  # failed calls in a row: each one doubles the pause
        self._last_error = ""
        self._buffer: torch.Tensor | None = None
        _probe(master, metadata, self.timeout_s)
        try:
            from mooncake.store import MooncakeDistributedStore
        except ImportError as e:
            raise StoreError(f"mooncake is not installed ({e}); pip install mooncake-transfer-engine-non-cuda") from e
        bind_here(local_hostname)  # its transfer engine's ports bind the wildcard address (pdserve.native)
        client = MooncakeDistributedStore()
        # NOTE: setup holds the GIL (no thread can bound it); _probe has just seen the master answer.
        try:
            code = client.setup(local_hostname, metadata, segment_size, buffer_size, protocol, device_name, master)
        except (TypeError, RuntimeError) as e:
            raise StoreError(f"mooncake setup rejected its options: {e}") from e
        if code != 0:
            # NOTE: never call into a client whose setup failed: Mooncake crashes the process.
            raise StoreError(
                f"cannot set up a Mooncake client against the master at {master} (metadata {metadata}): "
                f"code {code}; start a master with `pdserve store start` or point --kv-store-config at a running one"
            )
        self._client = client

    @property
    def is_busy(self) -> bool:
        """Whether a call that timed out is still running inside Mooncake (and may touch its blocks)."""
        return self._overrun is not None and not self._overrun.done.is_set()

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Wait until no call is running inside Mooncake; returns not is_busy."""
        overrun = self._overrun
        return overrun is None or overrun.done.wait(timeout_s)

    def register_buffer(self, buffer: torch.Tensor) -> None:
        if buffer.device.type != "cpu" or not buffer.is_contiguous():
            raise StoreError("the registered buffer must be a contiguous CPU tensor")
        ptr, nbytes = buffer.data_ptr(), buffer.numel() * buffer.element_size()
        code = self._run("register_buffer", lambda c: c.register_buffer(ptr, nbytes), _REGISTER_TIMEOUT_S, False)
        if code != 0:
            raise StoreError(f"mooncake register_buffer of {nbytes} bytes failed with code {code}")
        self._buffer = buffer  # keeps the registered memory alive

    def exists(self, keys: list[str]) -> list[bool]:
        if not keys:
            return []
        codes = self._run("exists", lambda c: c.batch_is_exist(keys))  # 1 present, 0 absent, <0 error
        self._check_codes("exists", codes, keys)
        return [code == 1 for code in codes]

    def put(self, keys: list[str], blocks: list[torch.Tensor]) -> list[bool]:
        if not keys:
            return []
        ptrs, sizes = self._addresses(blocks)
        codes = self._run("put", lambda c: c.batch_put_from(keys, ptrs, sizes))  # 0 written, <0 error
        self._check_codes("put", codes, keys)
        return [code >= 0 or code == _OBJECT_ALREADY_EXISTS for code in codes]

    def get(self, keys: list[str], blocks: list[torch.Tensor]) -> list[bool]:
        if not keys:
            return []
        ptrs, sizes = self._addresses(blocks)
        codes = self._run("get", lambda c: c.batch_get_into(keys, ptrs, sizes))  # bytes read, <0 error
        self._check_codes("get", codes, keys)
        return [code == size for code, size in zip(codes, sizes)]

    def close(self) -> None:
        """Tear the client down when the master answers; otherwise leave it open, so that close never blocks.

        Mooncake's teardown holds the GIL and, with the master gone, blocks the
        whole process 6-19 s (killed master) to 2 min (hung master). A client
        left open is torn down by Mooncake's own atexit handler (delaying exit
        by as much) and its segment is dropped by the master after client_ttl.
        """
        with self._lock:
            client, self._client = self._client, None
            if client is None:
                return
            if self.is_busy or self._last_error or client.health_check() != 0:
                _UNCLOSED.append(client)
                logger.warning("Mooncake master %s unreachable: client left open (torn down at exit)", self.master)
                return
            client.close()  # ~2 s, holding the GIL

    def _run(
        self, what: str, op: Callable[[Any], Any], timeout_s: float | None = None, check_health: bool = True
    ) -> Any:
        """op(client) on a worker thread; its result, or StoreError within about timeout_s."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        if not self._lock.acquire(timeout=timeout_s):
            raise StoreError(f"mooncake {what}: another thread held the store for {timeout_s:g}s")
        try:
            self._check_usable(what)
            client = self._client

            def call() -> Any:
                if check_health and client.health_check() == _MASTER_UNREACHABLE:
                    return _UNREACHABLE
                return op(client)

            pending = _Call(call)
            if not pending.done.wait(timeout_s):
                self._overrun = pending
                self._pause(f"{what} did not return within {timeout_s:g}s")
                raise StoreError(f"mooncake {what} did not return within {timeout_s:g}s (master {self.master})")
            if pending.error is not None:
                raise StoreError(f"mooncake {what} failed: {pending.error!r}")
            if pending.result is _UNREACHABLE:
                self._pause("master unreachable")
                raise StoreError(f"mooncake {what}: the master at {self.master} is unreachable")
            return pending.result
        finally:
            self._lock.release()

    def _check_usable(self, what: str) -> None:
        if self._client is None:
            raise StoreError(f"mooncake {what}: the store is closed")
        if self._overrun is not None:
            if not self._overrun.done.is_set():
                raise StoreError(f"mooncake {what} refused: an earlier call that timed out is still running")
            self._overrun = None  # its late result is dropped
        wait_s = self._retry_at - time.monotonic()
        if wait_s > 0:
            raise StoreError(
                f"mooncake {what} refused: store paused after '{self._last_error}'; retry in {wait_s:.1f}s"
            )

    def _pause(self, reason: str) -> None:
        """Fail fast for a while; the pause doubles with each failure in a row (up to MAX_COOLDOWN_S)."""
        pause_s = min(self.cooldown_s * 2 ** min(self._num_failures, 16), max(self.cooldown_s, MAX_COOLDOWN_S))
        self._num_failures += 1
        if not self._last_error:
            logger.warning("Mooncake store failing (%s); calls fail fast for %.1fs, then retry", reason, pause_s)
        self._last_error = reason
        self._retry_at = time.monotonic() + pause_s

    def _check_codes(self, what: str, codes: list[int], keys: list[str]) -> None:
        """Raise StoreError when the whole call failed (a malformed answer, or the master answered no key)."""
        if len(codes) != len(keys):
            raise StoreError(f"mooncake {what} returned {len(codes)} results for {len(keys)} keys")
        if all(code in _RPC_FAILURES for code in codes):
            self._pause(f"{what} got RPC error {codes[0]}")
            raise StoreError(f"mooncake {what}: the master at {self.master} did not answer (code {codes[0]})")
        if self._last_error:
            logger.info("Mooncake store answering again (after: %s)", self._last_error)
            self._last_error = ""
        self._num_failures = 0
        failed = [code for code in codes if code < 0 and code != _OBJECT_ALREADY_EXISTS]
        if failed:
            logger.debug(
                "mooncake %s: %d of %d keys failed, codes %s", what, len(failed), len(keys), sorted(set(failed))
            )

    def _addresses(self, blocks: list[torch.Tensor]) -> tuple[list[int], list[int]]:
        """(data_ptr, nbytes) of each block, each checked to lie inside the registered buffer."""
        if self._buffer is None:
            raise StoreError("mooncake store: call register_buffer before put/get")
        start = self._buffer.data_ptr()
        end = start + self._buffer.numel() * self._buffer.element_size()
        ptrs, sizes = [], []
        for block in blocks:
            ptr, nbytes = block.data_ptr(), block.numel() * block.element_size()
            if block.device.type != "cpu" or not block.is_contiguous() or ptr < start or ptr + nbytes > end:
                raise StoreError("mooncake blocks must be contiguous views inside the registered buffer")
            ptrs.append(ptr)
            sizes.append(nbytes)
        return ptrs, sizes


def _probe(master: str, metadata: str, timeout_s: float) -> None:
    """Fail fast unless the master port accepts and the HTTP metadata server answers (setup would block minutes)."""
    host, _, port = master.rpartition(":")
    if not host or not port.isdigit():
        raise StoreError(f"mooncake master {master!r} is not host:port, e.g. 127.0.0.1:50051")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
        if urlsplit(metadata).scheme == "http":
            try:
                urlopen(metadata, timeout=timeout_s).close()
            except HTTPError:
                pass  # it answered (400 without a key): alive
    except OSError as e:  # URLError and timeouts included
        raise StoreError(
            f"cannot reach the Mooncake master at {master} (metadata {metadata}): {e}; "
            "start one with `pdserve store start` or point --kv-store-config at a running master"
        ) from e
