"""`pdserve launch`'s supervisor: starts the parts as child processes, echoes their logs, watches, stops them.

It knows its children only by their command lines (plan.py renders them), GET /health and their exit codes.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, TextIO

from pdserve.launcher.plan import ROUTER, Part
from pdserve.procs import sigterm_on_parent_death
from pdserve.store.base import StoreError
from pdserve.store.master import MasterProcess

HEALTH_POLL_S = (0.1, 2.0)  # first and longest pause between /health polls (each probe is an access-log line)
STOP_TIMEOUT_S = 20.0
LOG_TAIL_LINES = 20


def _mask_secrets(argv: Sequence[str]) -> list[str]:
    return ["***" if i > 0 and argv[i - 1] == "--api-key" else a for i, a in enumerate(argv)]


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


# ---- the child processes -----------------------------------------------------------------------------


class Child:
    """One started part: the leader of its own process group, its log file, and the thread that fills and echoes it."""

    def __init__(
        self, part: Part, argv: list[str], env: Mapping[str, str], log_path: Path, echo: Callable[[str], None]
    ) -> None:
        self.part = part
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "wb")
        self._log.write(f"$ {shlex.join(_mask_secrets(argv))}\n".encode())
        self._log.flush()
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=dict(env),
                start_new_session=True,
                preexec_fn=sigterm_on_parent_death(),
            )
        except OSError:
            self._log.close()
            raise
        self._reader = threading.Thread(target=self._pump, args=(echo,), name=f"log-{part.name}", daemon=True)
        self._reader.start()

    def _pump(self, echo: Callable[[str], None]) -> None:
        assert self.proc.stdout is not None
        prefix = f"[{self.part.name}] "
        for line in iter(self.proc.stdout.readline, b""):
            self._log.write(line)
            self._log.flush()
            echo(prefix + line.decode(errors="replace").rstrip("\r\n"))
        self._log.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, num_lines: int = LOG_TAIL_LINES) -> str:
        if self.proc.poll() is not None:
            self._reader.join(1.0)  # the last lines of a process that just exited
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-num_lines:])

    def terminate(self) -> None:
        """SIGTERM the leader (it stops its own children); a group whose leader is gone gets it directly."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        elif _live_group_members(self.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGTERM)

    def is_gone(self) -> bool:
        return self.proc.poll() is not None and not _live_group_members(self.pid)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)

    def close(self) -> None:
        self._reader.join(2.0)


def _live_group_members(pgid: int) -> list[int]:
    """Pids in process group `pgid` that are not zombies (an orphaned zombie may never be reaped in a container)."""
    try:
        entries = os.listdir("/proc")
    except OSError:  # no procfs: a signal probe, which counts zombies too
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    members = []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != b"Z":
            members.append(int(entry))
    return members


# ---- the supervisor ----------------------------------------------------------------------------------


class Launcher:
    """Starts the parts in order, waits for their /health, watches them, and stops them all.

    `argv_for(part)` gives each part's command line (injectable for tests).
    Instances start together; the router starts once every instance answers
    /health with 200. `run(stop)` blocks until `stop` is set (returns 0) or a
    part fails: an exit, a failed /health, the start-up deadline (returns 1).
    Whatever happens, everything started is stopped before it returns: the
    router, then the instances (SIGTERM, SIGKILL to the group after
    `stop_timeout_s`), then the master. `ready` is set once all parts are up.
    NOTE: children get SIGTERM when the thread that started them ends (Linux
    PR_SET_PDEATHSIG): call `run` from a thread that outlives it, normally the main one.
    """

    def __init__(
        self,
        parts: Sequence[Part],
        argv_for: Callable[[Part], list[str]],
        log_dir: Path,
        env: Mapping[str, str],
        startup_timeout_s: float = 900.0,
        stop_timeout_s: float = STOP_TIMEOUT_S,
        master: MasterProcess | None = None,
        out: TextIO | None = None,
        err: TextIO | None = None,
    ) -> None:
        self.parts = list(parts)
        self.argv_for = argv_for
        self.log_dir = Path(log_dir)
        self.env = dict(env)
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.master = master
        self.children: list[Child] = []
        self.ready = threading.Event()
        self._out = out or sys.stdout
        self._err = err or sys.stderr
        self._write_lock = threading.Lock()

    def run(self, stop: threading.Event) -> int:
        try:
            if not self._start(stop):
                if stop.is_set():
                    self._say("stopped during start-up")
                    return 0
                return 1
            self._print_table()
            self.ready.set()
            while not stop.wait(0.5):
                if self._report_exits():
                    return 1
            self._say("stopping everything")
            return 0
        finally:
            self.shutdown()

    def _start(self, stop: threading.Event) -> bool:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._say(f"logs in {self.log_dir}")
        if self.master is not None:
            try:
                self.master.start()
            except StoreError as e:
                self._error(f"the Mooncake master did not start: {e}")
                return False
            if stop.is_set():
                return False
        deadline = time.monotonic() + self.startup_timeout_s
        instances = [p for p in self.parts if p.role != ROUTER]
        routers = [p for p in self.parts if p.role == ROUTER]
        for group in (instances, routers):
            for part in group:
                self.children.append(
                    Child(part, self.argv_for(part), self.env, self.log_dir / f"{part.name}.log", self._echo)
                )
            if not self._wait_healthy(group, deadline, stop):
                return False
        return True

    def _wait_healthy(self, parts: Sequence[Part], deadline: float, stop: threading.Event) -> bool:
        pending = list(parts)
        pause = HEALTH_POLL_S[0]
        while pending:
            if self._report_exits():
                return False
            for part in list(pending):
                status, body = _probe_health(part)
                if status == 200:
                    pending.remove(part)
                elif '"failed' in body:  # {"status": "failed: ..."}: the engine died, the API server stays up
                    self._error(
                        f"{part.name} ({part.role}) failed to start: {body.strip()[:500]}\n{self._tail_of(part)}"
                    )
                    return False
            if pending and time.monotonic() > deadline:
                names = ", ".join(p.name for p in pending)
                tails = "\n".join(self._tail_of(p) for p in pending)
                self._error(
                    f"{names} did not answer /health with 200 within {self.startup_timeout_s:g} s "
                    f"(--startup-timeout)\n{tails}"
                )
                return False
            if pending and stop.wait(pause):
                return False
            pause = min(pause * 1.5, HEALTH_POLL_S[1])
        return True

    def _report_exits(self) -> bool:
        """Report the first part (or the master) that has exited; whether one has."""
        for child in self.children:
            code = child.proc.poll()
            if code is not None:
                self._error(f"{child.part.name} ({child.part.role}) {describe_exit(code)}\n{self._tail_of(child.part)}")
                return True
        if self.master is not None and not self.master.is_running:
            tail = self.master.log_tail()
            self._error(f"the Mooncake master {describe_exit(self.master.stop() or 0)}; its last log lines:\n{tail}")
            return True
        return False

    def _tail_of(self, part: Part) -> str:
        child = next(c for c in self.children if c.part == part)
        return f"the last {LOG_TAIL_LINES} lines of {child.log_path}:\n{child.log_tail()}"

    def shutdown(self) -> None:
        """Stop everything started (idempotent): the router, then the instances together, then the master."""
        routers = [c for c in self.children if c.part.role == ROUTER]
        instances = [c for c in self.children if c.part.role != ROUTER]
        for group in (routers, instances):
            self._stop_children(group)
        if self.master is not None:
            self.master.stop()
        for child in self.children:
            child.close()

    def _stop_children(self, children: Sequence[Child]) -> None:
        for child in children:
            child.terminate()
        deadline = time.monotonic() + self.stop_timeout_s
        while any(not c.is_gone() for c in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        for child in children:
            if not child.is_gone():
                self._say(f"{child.part.name} did not stop within {self.stop_timeout_s:g} s of SIGTERM; killing it")
                child.kill()

    def _print_table(self) -> None:
        rows = [("PART", "ROLE", "URL", "PID", "LOG")]
        if self.master is not None:
            config = self.master.store_config()
            rows.append(
                (
                    "mooncake-master",
                    "kv store",
                    f"{config['master']} (metadata {config['metadata']})",
                    str(self.master.pid),
                    "(shown if it fails)",
                )
            )
        rows += [(c.part.name, c.part.role, c.part.url, str(c.pid), str(c.log_path)) for c in self.children]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        router = next((c.part for c in self.children if c.part.role == ROUTER), None)
        if router is not None:
            lines.append(f"OpenAI API: {router.url}/v1")
        lines.append("Ctrl-C or SIGTERM stops everything.")
        self._write(self._out, "\n".join(lines))

    def _echo(self, line: str) -> None:
        self._write(self._out, line)

    def _say(self, message: str) -> None:
        self._write(self._out, f"pdserve launch: {message}")

    def _error(self, message: str) -> None:
        self._write(self._err, f"pdserve launch: error: {message}")

    def _write(self, stream: TextIO, text: str) -> None:
        with self._write_lock, contextlib.suppress(OSError, ValueError):  # a closed stdout must not stop the logs
            stream.write(text + "\n")
            stream.flush()


def _probe_health(part: Part) -> tuple[int, str]:
    """(HTTP status, body) of GET /health; (0, "") when nothing answers."""
    try:
        with urllib.request.urlopen(f"{part.probe_url}/health", timeout=2) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError):
        return 0, ""


def run_until_signal(launcher: Launcher) -> int:
    """Run the launcher in the main thread until SIGINT or SIGTERM (then 0) or a failure (then 1)."""
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return launcher.run(stop)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
