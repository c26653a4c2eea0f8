"""A real `pdserve serve --max-num-seqs 1 --max-queue-len 0 --stall-timeout 2`: a full queue is a 503; a stalled
engine ends its streams and recovers; a dead engine is reported.

The tests run in file order on one server: the queue test first, the stall test, then the ones
that kill the engine core process (each kills it itself if an earlier one did not).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest

pytest.register_assert_rewrite("server_fixtures")  # before the import below: its asserts explain failures

from server_fixtures import (  # noqa: E402
    ServerProcess,
    assert_openai_error,
    server_process,
    wait_idle,
)

pytest_plugins = ["server_fixtures"]  # the server fixtures, shared by the test_server_* modules

LONG = {"prompt": "Tell me a very long story.", "max_tokens": 3000, "ignore_eos": True, "temperature": 0}
STALL_S = 2.0


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("small-server") / "pdserve-serve.log"
    # this module kills the engine on purpose, and a server whose engine died does not exit on SIGTERM
    # (see test_server_exits_after_engine_death), so a clean exit is not required here
    flags = ["--max-num-seqs", "1", "--max-queue-len", "0", "--stall-timeout", f"{STALL_S:g}"]
    yield from server_process(flags, log, require_clean_exit=False)


def test_full_queue_returns_503(small_server: ServerProcess) -> None:
    url = small_server.url
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{url}/v1/completions", json={**LONG, "stream": True}) as held:
            assert held.status_code == 200
            lines = held.iter_lines()  # NOTE: keep a reference; a collected iterator closes the connection
            next(line for line in lines if line.startswith("data: "))  # it is running
            for path, body in [
                ("/v1/completions", {"prompt": "hi", "max_tokens": 1}),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
                ("/v1/completions", {"prompt": "hi", "max_tokens": 1, "stream": True}),
            ]:
                r = client.post(f"{url}{path}", json=body)
                assert_openai_error(
                    r,
                    503,
                    "queue_full",
                    "the server is at its queue limit (1 open requests)",
                    "retry later or raise --max-queue-len",
                )
            assert client.get(f"{url}/health").status_code == 200
    m = wait_idle(url, timeout_s=15)
    assert m["pdserve_kv_blocks_free"] == m["pdserve_kv_blocks_total"]
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_stalled_engine_ends_its_streams_and_recovers(small_server: ServerProcess) -> None:
    """SIGSTOP the engine core mid-stream: keepalives, then an engine_stalled error event within the stall timeout
    (+ 2 s); /health and new requests say stalled; after SIGCONT it is healthy again and every block is free."""
    url = small_server.url
    engine = psutil.Process(small_server.engine_core_pid())
    lines: list[str] = []
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{url}/v1/completions", json={**LONG, "stream": True}) as held:
            it = held.iter_lines()
            next(line for line in it if line.startswith("data: "))
            engine.suspend()
            stopped = time.monotonic()
            try:
                for line in it:
                    lines.append(line)
                    if '"engine_stalled"' in line:
                        break
                seconds = time.monotonic() - stopped
                health = client.get(f"{url}/health")
                live = client.get(f"{url}/live")
                refused = client.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 1})
            finally:
                engine.resume()
    assert ": keepalive" in lines, lines[-5:]
    assert '"engine_stalled"' in lines[-1] and STALL_S <= seconds < STALL_S + 2, (seconds, lines[-3:])
    assert health.status_code == 503 and health.json()["status"].startswith("stalled: "), health.text
    assert live.status_code == 200  # liveness: the API process itself answers
    assert_openai_error(refused, 503, "engine_stalled", "no progress")
    wait_health(url, 200)
    m = wait_idle(url, timeout_s=15)
    assert m["pdserve_kv_blocks_free"] == m["pdserve_kv_blocks_total"]
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60).status_code == 200


def kill_engine(server: ServerProcess) -> None:
    """SIGKILL the engine core process, unless it is gone already."""
    try:
        pid = server.engine_core_pid()
    except AssertionError:
        return  # already dead
    os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(pid).wait(10)


def wait_health(url: str, status: int, timeout_s: float = 15.0) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while True:
        r = httpx.get(f"{url}/health", timeout=10)
        if r.status_code == status or time.monotonic() > deadline:
            return r
        time.sleep(0.1)


def test_engine_death_is_reported(small_server: ServerProcess) -> None:
    kill_engine(small_server)
    r = wait_health(small_server.url, 503)
    assert r.status_code == 503 and r.json()["status"].startswith("failed: "), r.text
    for path, body in [
        ("/v1/completions", {"prompt": "hi", "max_tokens": 1}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
    ]:
        r = httpx.post(f"{small_server.url}{path}", json=body, timeout=30)
        assert_openai_error(r, 503, "engine_dead", "the engine failed: ")


def test_server_exits_after_engine_death(small_server: ServerProcess) -> None:
    kill_engine(small_server)
    assert wait_health(small_server.url, 503).status_code == 503
    code, leftovers = small_server.stop(timeout_s=10)
    assert code in (0, -signal.SIGTERM), f"exit code {code} (None: it hung and was killed)"
    assert not leftovers
