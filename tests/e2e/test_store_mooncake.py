"""The Mooncake pool backend against a real local master: sharing across processes, master failures, the CLI.

Clients that outlive their master run in a child process that ends with
os._exit: Mooncake's atexit teardown would otherwise hold the test process for
12 s (killed master) to over a minute (hung master).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import require_module

require_module("mooncake.store")  # under CI=true a missing Mooncake fails instead of skipping

from pdserve.store import StoreError  # noqa: E402
from pdserve.store.master import MasterProcess, is_port_open  # noqa: E402
from pdserve.store.mooncake import MooncakeStore  # noqa: E402

BLOCK_BYTES = 4096
SMALL = {"global_segment_size": "16MiB", "local_buffer_size": "16MiB"}
SLACK_S = 0.5  # thread start, IPC and a loaded 2-core machine

CHILD = r"""
import json, os, sys, time, zlib
import torch
from pdserve.store import StoreError
from pdserve.store.mooncake import MooncakeStore

def pattern(key):
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=generator)

def reply(message):
    print(json.dumps(message), flush=True)

try:
    store = MooncakeStore(**json.loads(sys.argv[1]))
except StoreError as e:
    reply({"error": str(e)})
    os._exit(0)
buffer = torch.zeros(8, 4096, dtype=torch.uint8)
store.register_buffer(buffer)
reply({"ready": True})
for line in sys.stdin:
    command = json.loads(line)
    op, keys = command["op"], command.get("keys", [])
    blocks = [buffer[i] for i in range(len(keys))]
    if op == "exit":
        os._exit(0)
    start = time.monotonic()
    try:
        if op == "put":
            for key, block in zip(keys, blocks):
                block.copy_(pattern(key))
            out = {"result": store.put(keys, blocks)}
        elif op == "get":
            buffer.zero_()
            result = store.get(keys, blocks)
            out = {"result": result, "equal": [torch.equal(b, pattern(k)) for k, b in zip(keys, blocks)]}
        elif op == "exists":
            out = {"result": store.exists(keys)}
        else:
            store.close()
            out = {"result": None}
    except StoreError as e:
        out = {"error": str(e)}
    out["seconds"] = time.monotonic() - start
    out["is_busy"] = store.is_busy
    reply(out)
"""


def pattern(key: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return torch.randint(0, 256, (BLOCK_BYTES,), dtype=torch.uint8, generator=generator)


def free_ports(num: int) -> list[int]:
    sockets = [socket.socket() for _ in range(num)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def new_master(**kwargs: Any) -> MasterProcess:
    port, metadata_port = free_ports(2)
    return MasterProcess(port=port, metadata_port=metadata_port, **kwargs)


class Child:
    """A MooncakeStore client in another process, driven by JSON lines."""

    def __init__(self, config: dict[str, Any], log: Path) -> None:
        self.log = log
        with log.open("wb") as stderr:  # Mooncake logs there
            self.proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(config)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=stderr, text=True)  # fmt: skip
        self.start_message = self._read()

    def call(self, op: str, keys: list[str] | None = None) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, "keys": keys or []}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"child exited ({self.proc.poll()}); log tail:\n{self.log.read_text()[-3000:]}"
        return json.loads(line)

    def exit(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
        self.proc.stdin.flush()
        with self.proc:  # closes the pipes, waits
            return self.proc.wait(30)

    def kill(self) -> None:
        if self.proc.poll() is None:
            with self.proc:
                self.proc.kill()


@pytest.fixture(scope="module")
def master() -> Iterator[MasterProcess]:
    with new_master() as running:
        yield running


@pytest.fixture(scope="module")
def store(master: MasterProcess) -> Iterator[tuple[MooncakeStore, torch.Tensor]]:
    client = MooncakeStore(**master.store_config(), **SMALL)
    buffer = torch.zeros(8, BLOCK_BYTES, dtype=torch.uint8)  # [num_blocks, block bytes]
    client.register_buffer(buffer)
    yield client, buffer
    client.close()


@pytest.mark.timeout(120)
def test_objects_are_shared_across_processes(master: MasterProcess, tmp_path: Path, store: Any) -> None:
    client, buffer = store
    keys = ["shared:0@0", "shared:1@0", "shared:2@0"]
    for i, key in enumerate(keys):
        buffer[i] = pattern(key)
    assert client.put(keys, [buffer[0], buffer[1], buffer[2]]) == [True, True, True]

    child = Child({**master.store_config(), **SMALL}, tmp_path / "child.log")
    try:
        assert child.start_message == {"ready": True}
        assert child.call("exists", keys + ["shared:9@0"])["result"] == [True, True, True, False]
        got = child.call("get", keys + ["shared:9@0"])
        assert got["result"] == [True, True, True, False] and got["equal"][:3] == [True, True, True]
        assert child.call("put", ["from-child"])["result"] == [True]

        assert client.exists(["from-child"]) == [True]
        assert client.get(["from-child"], [buffer[4]]) == [True]
        assert torch.equal(buffer[4], pattern("from-child"))
        assert child.call("close")["result"] is None
    finally:
        assert child.exit() == 0


@pytest.mark.timeout(60)
def test_misses_and_bad_views(store: Any) -> None:
    client, buffer = store
    buffer[0] = pattern("k")
    buffer[1] = 7
    assert client.put(["k"], [buffer[0]]) == [True]
    assert client.put(["k"], [buffer[1]]) == [True]  # immutable: the first write stays
    assert client.get(["k", "missing"], [buffer[2], buffer[3]]) == [True, False]
    assert torch.equal(buffer[2], pattern("k"))
    assert client.exists(["missing", "k"]) == [False, True]
    assert client.get(["k"], [buffer[3, : BLOCK_BYTES // 2]]) == [False]  # view too small
    assert client.get(["k"], [buffer[3:5].view(-1)]) == [False]  # view too large
    with pytest.raises(StoreError, match="inside the registered buffer"):
        client.put(["x"], [torch.zeros(BLOCK_BYTES, dtype=torch.uint8)])
    assert client.is_busy is False and client.wait_idle(0) is True


@pytest.mark.timeout(60)
def test_no_master_fails_fast_with_what_to_do() -> None:
    port, metadata_port = free_ports(2)
    start = time.monotonic()
    with pytest.raises(StoreError, match=rf"127\.0\.0\.1:{port} .*`pdserve store start`"):
        MooncakeStore(master=f"127.0.0.1:{port}", metadata=f"http://127.0.0.1:{metadata_port}/metadata", **SMALL)
    assert time.monotonic() - start < 2.0


def assert_failed_fast(answer: dict[str, Any], timeout_s: float) -> None:
    """A call on a dead master: StoreError, or no key succeeded; within timeout_s + slack."""
    assert answer["seconds"] <= timeout_s + SLACK_S, answer
    assert "error" in answer or not any(answer["result"]), answer


@pytest.mark.timeout(120)
def test_master_killed_calls_fail_fast_then_recover(tmp_path: Path) -> None:
    timeout_s = 1.0
    master = new_master()
    master.start()
    config = {**master.store_config(), **SMALL, "timeout_s": timeout_s, "cooldown_s": 1.0}
    child = Child(config, tmp_path / "child.log")
    try:
        assert child.call("put", ["a", "b"])["result"] == [True, True]
        os.kill(master.pid, signal.SIGKILL)
        assert master.stop() == -signal.SIGKILL
        answers = []
        for _ in range(4):  # past the first cooldown: a call that overruns or finds the master unreachable
            for op in ("exists", "get", "put"):
                wall = time.monotonic()
                answer = child.call(op, ["a"])
                assert time.monotonic() - wall <= timeout_s + SLACK_S, answer
                assert_failed_fast(answer, timeout_s)
                answers.append(answer)
            time.sleep(0.5)
        assert any("error" in answer for answer in answers)

        restarted = MasterProcess(port=master.port, metadata_port=master.metadata_port)
        restarted.start()
        try:
            deadline = time.monotonic() + 30
            while child.call("put", ["c"]).get("result") != [True]:
                assert time.monotonic() < deadline, "the client did not reconnect to the restarted master"
                time.sleep(0.5)
            got = child.call("get", ["c"])
            assert got["result"] == [True] and got["equal"] == [True]
            assert child.call("exists", ["a"])["result"] == [False]  # the new master's index starts empty
        finally:
            assert child.exit() == 0
            restarted.stop()
    finally:
        child.kill()
        master.stop()


@pytest.mark.timeout(120)
def test_master_hung_calls_time_out_and_close_returns(tmp_path: Path) -> None:
    timeout_s = 1.0
    master = new_master()
    master.start()
    config = {**master.store_config(), **SMALL, "timeout_s": timeout_s, "cooldown_s": 1.0}
    child = Child(config, tmp_path / "child.log")
    try:
        assert child.call("put", ["a"])["result"] == [True]
        os.kill(master.pid, signal.SIGSTOP)  # Mooncake's own RPC timeout is 30 s
        first = child.call("get", ["a"])
        assert "did not return within 1s" in first["error"] and first["is_busy"] is True
        assert first["seconds"] <= timeout_s + SLACK_S
        for op in ("exists", "get", "put"):
            answer = child.call(op, ["a"])
            assert "still running" in answer["error"] and answer["seconds"] < SLACK_S, answer
        closed = child.call("close")
        assert closed["result"] is None and closed["seconds"] < SLACK_S

        start = time.monotonic()  # a new client: the metadata probe times out (setup would block for minutes)
        with pytest.raises(StoreError, match=r"cannot reach the Mooncake master .*timed out"):
            MooncakeStore(**config)
        assert time.monotonic() - start <= timeout_s + SLACK_S
        assert "closed" in child.call("get", ["a"])["error"]
        assert child.exit() == 0
    finally:
        child.kill()
        os.kill(master.pid, signal.SIGKILL)
        master.stop()


@pytest.mark.timeout(60)
def test_master_refuses_a_port_in_use(master: MasterProcess) -> None:
    with pytest.raises(StoreError, match=rf"127\.0\.0\.1:{master.port} is already in use .*--port"):
        MasterProcess(port=master.port, metadata_port=free_ports(1)[0]).start()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_store_start_prints_config_and_stops_cleanly(stop_signal: signal.Signals) -> None:
    port, metadata_port = free_ports(2)
    command = [sys.executable, "-m", "pdserve.store.master", "store", "start", "--port", str(port),
               "--metadata-port", str(metadata_port), "--log-level", "warning"]  # fmt: skip
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as proc:
        try:
            assert proc.stdout is not None
            config = json.loads(proc.stdout.readline())
            assert config == {"master": f"127.0.0.1:{port}", "metadata": f"http://127.0.0.1:{metadata_port}/metadata"}
            assert is_port_open("127.0.0.1", port) and is_port_open("127.0.0.1", metadata_port)
            proc.send_signal(stop_signal)
            assert proc.wait(20) == 0
            assert not is_port_open("127.0.0.1", port) and not is_port_open("127.0.0.1", metadata_port)
        finally:
            if proc.poll() is None:
                proc.kill()
