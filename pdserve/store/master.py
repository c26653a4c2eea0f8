"""A local Mooncake master (with its HTTP metadata server) as a child process, and `pdserve store start`.

The master only keeps the object index; the bytes live in the memory that each
connected client (every engine process with `--kv-store mooncake`) contributes.
This module knows nothing about the client: it starts, probes and stops the
`mooncake_master` binary that ships with the `mooncake-transfer-engine` wheels.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from pdserve.native import ShimUnavailable, preload_env
from pdserve.store.base import StoreError

_GLOG_LEVELS = {"DEBUG": 0, "INFO": 0, "WARNING": 1, "ERROR": 2}
_PR_SET_PDEATHSIG = 1
_STDERR_FD = 2


def find_master_binary() -> str:
    """The `mooncake_master` executable: the one inside the installed `mooncake` package, else the one on PATH."""
    try:
        import mooncake

        packaged = os.path.join(os.path.dirname(os.path.abspath(mooncake.__file__)), "mooncake_master")
        if os.path.isfile(packaged) and os.access(packaged, os.X_OK):
            return packaged
    except ImportError:
        pass
    found = shutil.which("mooncake_master")
    if found is None:
        raise StoreError("mooncake_master not found; pip install mooncake-transfer-engine-non-cuda (or the CUDA build)")
    return found


def is_port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


class MasterProcess:
    """One `mooncake_master` child bound to `host`, serving RPC on `port` and metadata over HTTP on `metadata_port`.

    `start()` blocks until both ports accept connections (or raises StoreError
    with the master's last log lines); `stop()` sends SIGTERM, then SIGKILL
    after `stop_timeout_s`. The child gets SIGTERM if this process dies first
    (NOTE: Linux ties that to the starting thread: start it from one that lives as long).
    With `inherit_output` its log goes to this process's stderr; otherwise it is
    kept in a temporary file, for error messages only.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 50051,
        metadata_port: int = 8080,
        metrics_port: int = 0,
        log_level: str = "WARNING",
        extra_args: tuple[str, ...] = (),
        inherit_output: bool = False,
        start_timeout_s: float = 20.0,
        stop_timeout_s: float = 10.0,
    ) -> None:
        if log_level.upper() not in _GLOG_LEVELS:
            raise StoreError(f"log level {log_level!r} is not one of {', '.join(_GLOG_LEVELS)}")
        self.host = host
        self.port = port
        self.metadata_port = metadata_port
        self.metrics_port = metrics_port  # the master's admin/metrics HTTP port; 0 picks a free one
        self.log_level = log_level.upper()
        self.extra_args = tuple(extra_args)
        self.inherit_output = inherit_output
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        return [
            find_master_binary(),
            f"--rpc_address={self.host}", f"--rpc_port={self.port}",
            "--enable_http_metadata_server=true",
            f"--http_metadata_server_host={self.host}", f"--http_metadata_server_port={self.metadata_port}",
            f"--metrics_host={self.host}", f"--metrics_port={self.metrics_port}",
            "--logtostderr", f"--minloglevel={_GLOG_LEVELS[self.log_level]}",
            *self.extra_args,
        ]  # fmt: skip

    def store_config(self) -> dict[str, Any]:
        """The MooncakeStore options (`--kv-store-config`) that reach this master."""
        return {"master": f"{self.host}:{self.port}", "metadata": f"http://{self.host}:{self.metadata_port}/metadata"}

    def start(self) -> None:
        if self._proc is not None:
            raise StoreError("this master was already started")
        for name, port in (("--port", self.port), ("--metadata-port", self.metadata_port)):
            if is_port_open(self.host, port):
                raise StoreError(f"{self.host}:{port} is already in use (another master?); pick a free {name}")
        command = self.command()
        self._log = None if self.inherit_output else tempfile.TemporaryFile(prefix="mooncake-master-")
        self._proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log or _STDERR_FD,  # stdout is reserved for the config line (cmd_store_start)
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_parent_death_signal(),
            env=_master_env(self.host),
        )
        deadline = time.monotonic() + self.start_timeout_s
        while not (is_port_open(self.host, self.port, 0.2) and is_port_open(self.host, self.metadata_port, 0.2)):
            code = self._proc.poll()
            if code is not None:
                tail = self.log_tail()
                self._release()
                raise StoreError(f"mooncake_master exited with code {code} during startup:\n{tail}")
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise StoreError(
                    f"mooncake_master did not open {self.host}:{self.port} and :{self.metadata_port} within "
                    f"{self.start_timeout_s:g}s:\n{tail}"
                )
            time.sleep(0.05)

    def stop(self) -> int | None:
        """Terminate the master (idempotent); returns its exit code, None when it was never started."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._release()
        return proc.returncode

    def log_tail(self, num_lines: int = 20) -> str:
        """The master's last log lines (empty with inherit_output)."""
        if self._log is None:
            return ""
        self._log.seek(0)
        lines = self._log.read().decode(errors="replace").splitlines()
        return "\n".join(lines[-num_lines:])

    def _release(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> MasterProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _parent_death_signal() -> Callable[[], None] | None:
    """A pre-exec hook asking Linux to SIGTERM the child when this process dies (None where unavailable).

    libc is resolved here, in the parent: the child must not dlopen between fork and exec.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def add_store_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    store = subparsers.add_parser("store", help="the KV pool's Mooncake master (docs/kv-store.md)")
    store_sub = store.add_subparsers(dest="store_command", required=True)
    start = store_sub.add_parser("start", help="run a Mooncake master with its HTTP metadata server (foreground)")
    start.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    start.add_argument("--port", type=int, default=50051, help="master RPC port")
    start.add_argument("--metadata-port", type=int, default=8080, help="HTTP metadata server port")
    start.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=tuple(_GLOG_LEVELS),
        help="the master's log level (its log goes to stderr)",
    )
    start.set_defaults(func=cmd_store_start)


def cmd_store_start(args: argparse.Namespace) -> int:
    """Run the master until Ctrl-C or SIGTERM; print the `--kv-store-config` JSON once it is up."""
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    master = MasterProcess(
        host=args.host, port=args.port, metadata_port=args.metadata_port, log_level=args.log_level, inherit_output=True
    )
    try:
        master.start()
        config = json.dumps(master.store_config())
        print(config, flush=True)
        print(
            f"pdserve: Mooncake master ready; run engines with --kv-store mooncake --kv-store-config '{config}' "
            "(Ctrl-C stops it)",
            file=sys.stderr,
            flush=True,
        )
        while not stop.wait(0.5):
            if not master.is_running:
                print(f"pdserve: error: mooncake_master exited with code {master.stop()}", file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        pass
    except StoreError as e:
        print(f"pdserve: error: {e}", file=sys.stderr)
        return 1
    finally:
        master.stop()
        signal.signal(signal.SIGTERM, previous)
    return 0


def _master_env(host: str) -> dict[str, str]:
    """The master's environment: the bind-address shim, since its HTTP metadata server ignores
    --http_metadata_server_host and binds every interface (pdserve.native)."""
    try:
        return preload_env(host)
    except ShimUnavailable as e:
        raise StoreError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    """`python -m pdserve.store.master store start ...`: the same as `pdserve store start ...`."""
    parser = argparse.ArgumentParser(prog="python -m pdserve.store.master")
    add_store_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
