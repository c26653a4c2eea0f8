"""Real `pdserve serve` subprocesses for the end-to-end server tests, and helpers to talk to them.

A server runs on a free loopback port with the flags a test module asks for;
its stdout and stderr (uvicorn access log, API and engine logs) go to a file
that is printed when a test using it fails. Teardown sends SIGTERM and asserts
that the API process and the engine core process both exit.

Test modules load this file as a plugin (`pytest_plugins = ["server_fixtures"]`),
so the main server (default flags plus --api-key) is one session fixture shared
by every module that uses it: the model loads once per session.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from pdserve.bench.launch import free_port  # re-exported: test modules import it from here

MODEL_NAME = "SmolLM2-135M-Instruct"
VOCAB_SIZE = 49152
MAX_MODEL_LEN = 8192
API_KEY = "pdserve-e2e-key"
STARTUP_TIMEOUT_S = 180.0
EXIT_TIMEOUT_S = 30.0
LOG_TAIL_LINES = 300


_LIVE: list[ServerProcess] = []  # servers started and not yet stopped, in this test process


@dataclass(eq=False)
class ServerProcess:
    """One `pdserve serve` subprocess. `start` returns at once; `wait_ready` blocks until /health is 200."""

    flags: list[str]
    log_path: Path
    api_key: str | None = None
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    engine_pids: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def start(self) -> ServerProcess:
        args = [sys.executable, "-m", "pdserve.cli", "serve", "--port", str(self.port), *self.flags]
        if self.api_key:
            args += ["--api-key", self.api_key]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("PDSERVE_API_KEY", None)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            log.write(f"$ {' '.join(args)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        _LIVE.append(self)
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, num_lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log_text().splitlines()[-num_lines:])

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> ServerProcess:
        assert self.proc is not None, "call start() first"
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"pdserve serve exited with code {self.proc.returncode} before /health "
                    f"answered 200; its log ({self.log_path}):\n{self.log_tail()}"
                )
            try:
                r = httpx.get(f"{self.url}/health", timeout=5)
                if r.status_code == 200:
                    self.engine_pids = [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]
                    return self
                last = f"{r.status_code} {r.text}"
            except httpx.TransportError as e:
                last = repr(e)
            time.sleep(0.25)
        raise RuntimeError(
            f"pdserve serve did not answer /health with 200 within {timeout_s:.0f} s (last: {last}); "
            f"its log ({self.log_path}):\n{self.log_tail()}"
        )

    def engine_core_pid(self) -> int:
        """The pid of the spawned engine core process (not the multiprocessing resource tracker)."""
        for pid in self.engine_pids:
            try:
                if "spawn_main" in " ".join(psutil.Process(pid).cmdline()):
                    return pid
            except psutil.NoSuchProcess:
                continue
        raise AssertionError(f"no engine core process among the server's children {self.engine_pids}")

    def stop(self, timeout_s: float = EXIT_TIMEOUT_S) -> tuple[int | None, list[int]]:
        """SIGTERM the server; SIGKILL whatever is left after `timeout_s`.

        Returns (exit code, or None where it had to be killed; pids of children that outlived it).
        """
        if self.proc is None:
            return 0, []
        if self in _LIVE:
            _LIVE.remove(self)
        children = list(self.engine_pids)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            code = None
        procs = []
        for pid in children:
            try:
                procs.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            p.kill()
        return code, [p.pid for p in alive]


def server_process(
    flags: list[str], log_path: Path, api_key: str | None = None, require_clean_exit: bool = True
) -> Iterator[ServerProcess]:
    """Generator body for a server fixture: start, wait for health, yield, stop and check the exit."""
    server = ServerProcess(flags, log_path, api_key).start()
    try:
        server.wait_ready()
        yield server
    finally:
        code, leftovers = server.stop()
    if require_clean_exit:
        assert_clean_exit(server, code, leftovers)


def assert_clean_exit(server: ServerProcess, code: int | None, leftovers: list[int]) -> None:
    """A graceful exit: uvicorn finishes its shutdown, then re-raises SIGTERM (exit code -15) or returns 0."""
    assert code in (0, -signal.SIGTERM), (
        f"pdserve serve did not exit within {EXIT_TIMEOUT_S:.0f} s of SIGTERM (exit code {code}; None: it had to be "
        f"killed); log:\n{server.log_tail()}"
    )
    assert "Application shutdown complete." in server.log_text(), f"no graceful shutdown; log:\n{server.log_tail()}"
    assert not leftovers, f"engine processes {leftovers} outlived the server; log:\n{server.log_tail()}"


@pytest.fixture(autouse=True)
def server_log_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """When a test fails, print what each live server logged while it ran."""
    failed_before = request.session.testsfailed
    offsets = {id(s): len(s.log_text()) for s in _LIVE}
    yield
    if request.session.testsfailed == failed_before:
        return
    time.sleep(0.2)  # the server processes write their log lines on their own
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    for s in _LIVE:
        text = s.log_text()[offsets.get(id(s), 0) :][-30000:]
        message = f"\n===== pdserve serve log during {request.node.nodeid} ({s.log_path}) =====\n{text}"
        if reporter is not None:
            reporter.write_line(message)
        else:
            print(message, file=sys.stderr)


# ---- the shared main server -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def server_starting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The main server, started but maybe still loading (lets a module do work while the model loads)."""
    server = ServerProcess([], tmp_path_factory.mktemp("server") / "pdserve-serve.log", API_KEY).start()
    yield server
    assert_clean_exit(server, *server.stop())


@pytest.fixture(scope="session")
def server(server_starting: ServerProcess) -> ServerProcess:
    """The main server (default flags, --api-key API_KEY), ready."""
    return server_starting.wait_ready()


# ---- talking to a server ------------------------------------------------------------------------------


def metrics(url: str) -> dict[str, float]:
    """Prometheus samples by name (labels kept in the key, e.g. 'pdserve_requests_total{finish_reason="stop"}')."""
    r = httpx.get(f"{url}/metrics", timeout=10)
    assert r.status_code == 200, r.text
    out: dict[str, float] = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_idle(url: str, timeout_s: float = 30.0) -> dict[str, float]:
    """Poll /metrics until nothing runs or waits and every KV block is free; return the samples."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = metrics(url)
        if (
            m["pdserve_kv_blocks_free"] == m["pdserve_kv_blocks_total"]
            and m["pdserve_num_requests_running"] == 0
            and m["pdserve_num_requests_waiting"] == 0
        ):
            return m
        if time.monotonic() > deadline:
            keys = (
                "pdserve_kv_blocks_free",
                "pdserve_kv_blocks_total",
                "pdserve_num_requests_running",
                "pdserve_num_requests_waiting",
            )
            raise AssertionError(f"the server did not go idle within {timeout_s:.0f} s: { {k: m[k] for k in keys} }")
        time.sleep(0.1)


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None, *fragments: str) -> str:
    """`r` is an OpenAI-style error with this status (and code); its message holds every fragment."""
    assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text}"
    assert "Traceback" not in r.text and 'File "' not in r.text, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "code"}, err
    assert isinstance(err["message"], str) and err["message"].strip(), err
    assert err["type"] == ("invalid_request_error" if status < 500 else "server_error"), err
    if code is not None:
        assert err["code"] == code, err
    for fragment in fragments:
        assert fragment in err["message"], f"{fragment!r} not in {err['message']!r}"
    return str(err["message"])


def sse_events(text: str) -> list[Any]:
    """The data payloads of a server-sent-event body, '[DONE]' kept as the string."""
    events: list[Any] = []
    for block in text.split("\n\n"):
        block = block.strip()
        if not block or block == ": keepalive":  # a quiet stream's keepalive comment (docs/server.md)
            continue
        assert block.startswith("data: "), f"not an SSE data line: {block!r}"
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def request_ids_in_log(log: str, max_tokens: int) -> list[str]:
    """Ids of the requests the engine logged as added with this max_tokens."""
    return re.findall(rf"request (\S+) added: \d+ prompt tokens, max_tokens {max_tokens}\b", log)
