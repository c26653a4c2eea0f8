"""A spawned helper process and the pipe to it, for probes and benchmarks that need a second process.

Messages are bytes (the users speak JSON over them; nothing is pickled but the Pipe itself). Every
reply is awaited with the child's liveness checked, so a child that died or hangs is an error that
names it, never a hang.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable
from typing import Any


class PipedChild:
    """`target(conn, *args)` in a spawned daemon process. Errors are `error(f"{what} ...{detail()}")`, where
    `detail` may add, say, the tail of the child's log."""

    def __init__(
        self,
        target: Callable[..., None],
        args: tuple[Any, ...],
        name: str,
        what: str,
        error: type[Exception] = RuntimeError,
        detail: Callable[[], str] = lambda: "",
    ) -> None:
        self.what = what
        self.error = error
        self.detail = detail
        ctx = mp.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=target, args=(child_conn, *args), name=name, daemon=True)
        self.process.start()
        child_conn.close()

    def exited(self) -> Exception:
        return self.error(f"{self.what} exited (exit code {self.process.exitcode}){self.detail()}")

    def send(self, data: bytes) -> None:
        try:
            self.conn.send_bytes(data)
        except OSError as e:
            raise self.exited() from e

    def recv(self, timeout_s: float) -> bytes:
        deadline = time.monotonic() + timeout_s
        while not self.conn.poll(0.1):
            if not self.process.is_alive() and not self.conn.poll(0):
                raise self.exited()
            if time.monotonic() > deadline:
                raise self.error(f"{self.what} did not answer within {timeout_s:.0f} s{self.detail()}")
        try:
            return self.conn.recv_bytes()
        except (EOFError, OSError) as e:
            raise self.exited() from e

    def close(self, stop: bytes, timeout_s: float) -> None:
        """Send `stop`, wait `timeout_s` for the child to end, then kill it; safe twice."""
        if self.process.is_alive():
            try:
                self.conn.send_bytes(stop)
            except OSError:
                pass
            self.process.join(timeout_s)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(5.0)
        self.conn.close()
