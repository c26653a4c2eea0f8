"""`pdserve launch` end to end: a prefill and a decode instance of the default model behind the router, one
completion through the OpenAI API, every listener of every process on loopback (Mooncake's included), then SIGTERM: exit code 0 and no process of the deployment left. With
--kv-transfer storage, the launcher's Mooncake master carries the KV."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from server_fixtures import STARTUP_TIMEOUT_S, free_port

STOP_TIMEOUT_S = 60.0


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _wait_router(proc: subprocess.Popen[bytes], url: str, output: Path) -> None:
    deadline = time.monotonic() + 2 * STARTUP_TIMEOUT_S  # two instances load the model on a shared CPU
    last = "no answer"
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"pdserve launch exited with code {proc.returncode}:\n{output.read_text()}"
        try:
            r = httpx.get(f"{url}/health", timeout=5)
            # the router can answer before the launcher has seen every part ready and printed its table
            if r.status_code == 200 and "OpenAI API:" in output.read_text(errors="replace"):
                return
            last = f"{r.status_code} {r.text}"
        except httpx.TransportError as e:
            last = repr(e)
        time.sleep(0.5)
    raise AssertionError(
        f"the router did not answer /health within the deadline (last: {last}):\n{output.read_text()[-20000:]}"
    )


def _listeners(pids: list[int]) -> list[tuple[int, str]]:
    """(pid, 'address:port') of every TCP listener of these processes."""
    found = []
    for pid in pids:
        try:
            connections = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        found += [(pid, f"{c.laddr.ip}:{c.laddr.port}") for c in connections if c.status == psutil.CONN_LISTEN]
    return found


def _is_loopback(address: str) -> bool:
    ip = address.rsplit(":", 1)[0]
    return ip.startswith("127.") or ip in ("::1", "::ffff:127.0.0.1")


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("kv_transfer", ["direct", "storage"])
def test_launch_serves_a_completion_and_stops_cleanly(kv_transfer: str, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_dir = tmp_path / "logs"
    output = tmp_path / "launch.out"
    argv = [
        sys.executable,
        "-m",
        "pdserve.cli",
        "launch",
        "--port",
        str(port),
        "--max-model-len",
        "512",
        "--num-blocks",
        "128",
        "--log-dir",
        str(log_dir),
        "--kv-transfer",
        kv_transfer,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PDSERVE_API_KEY", None)
    with open(output, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    children: list[int] = []
    code: int | None = None
    try:
        _wait_router(proc, url, output)
        children = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        assert len(children) >= 5, children  # router, 2 API servers, 2 engine cores (and their helpers)
        r = httpx.post(
            f"{url}/v1/completions",
            timeout=120,
            json={"prompt": "Hello", "max_tokens": 8, "temperature": 0, "ignore_eos": True},
        )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 8, r.json()
        listeners = _listeners([proc.pid, *children])
        public = [(pid, address) for pid, address in listeners if not _is_loopback(address)]
        assert public == [], f"listening beyond loopback: {public}\n(all: {listeners})"
        # the router, 2 API servers, 2 engine cores' control channels and Mooncake's ports (and the master's)
        assert len(listeners) >= (11 if kv_transfer == "storage" else 8), listeners
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(STOP_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        deadline = time.monotonic() + 10  # orphans are reaped by whoever adopts them
        while _alive(children) and time.monotonic() < deadline:
            time.sleep(0.1)
        leftovers = _alive(children)
        for pid in leftovers:
            psutil.Process(pid).kill()
    text = output.read_text(errors="replace")
    assert code == 0, text[-20000:]
    assert not leftovers, f"left running after the launcher exited: {leftovers}\n{text[-20000:]}"
    assert f"OpenAI API: {url}/v1" in text and "[prefill-0] " in text and "[decode-0] " in text, text[-20000:]
    assert {"prefill-0.log", "decode-0.log", "router.log"} <= {f.name for f in log_dir.iterdir()}
    if kv_transfer == "storage":
        assert "mooncake-master" in text and "KV of 1 blocks in the pool" in text, text[-20000:]
