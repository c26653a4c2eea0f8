"""The cluster secret on real processes: a `pdserve router --cluster-secret` refuses /register without it; a P/D
pair started with it joins that router (--register-with) and serves through it, while control messages pushed
without it (or with another one) are dropped and logged; an instance whose control socket would bind beyond loopback without one refuses to
start."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import zmq

pytest.register_assert_rewrite("server_fixtures", "pd_fixtures")

from pd_fixtures import RouterProcess, completion, start_instance, stop_all  # noqa: E402

from pdserve.disagg.control import REFUSED_BAD_MAC, REFUSED_NO_MAC, authenticator  # noqa: E402
from pdserve.messages import KVAbort, KVDone, encode  # noqa: E402
from pdserve.router.membership import SECRET_HEADER  # noqa: E402

pytest_plugins = ["server_fixtures"]

SECRET = "e2e-cluster-secret"
FLAGS = ["--max-model-len", "1024", "--num-blocks", "128", "--cluster-secret", SECRET]


def _wait_for(check, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def _answers(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=2)
        return True
    except httpx.TransportError:
        return False


def test_router_registration_needs_the_secret(tmp_path: Path) -> None:
    router = RouterProcess(["--cluster-secret", SECRET], tmp_path / "router.log").start()
    body = {"url": "http://127.0.0.1:1", "role": "decode", "interval": 60}
    try:
        _wait_for(lambda: _answers(router.url), 60, f"the router did not start:\n{router.log_text()[-3000:]}")
        for headers in ({}, {SECRET_HEADER: "wrong"}):
            for path in ("/register", "/unregister"):
                resp = httpx.post(f"{router.url}{path}", json=body, headers=headers, timeout=5)
                assert resp.status_code == 403, resp.text
                assert resp.json()["error"]["code"] == "invalid_cluster_secret"
        assert httpx.get(f"{router.url}/health").json()["instances"] == []
        ok = httpx.post(f"{router.url}/register", json=body, headers={SECRET_HEADER: SECRET}, timeout=5)
        assert ok.status_code == 200 and ok.json()["status"] == "registered", ok.text
        assert [i["url"] for i in httpx.get(f"{router.url}/health").json()["instances"]] == [body["url"]]
        gone = httpx.post(f"{router.url}/unregister", json=body, headers={SECRET_HEADER: SECRET}, timeout=5)
        assert gone.status_code == 200 and gone.json()["status"] == "unregistered", gone.text
    finally:
        router.stop()


def _push(address: str, frames: list[bytes]) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 2000)
    try:
        sock.connect(address)
        sock.send_multipart(frames)
    finally:
        sock.close()  # lingers until the message is out
        ctx.term()


@pytest.mark.slow
def test_control_messages_without_the_secret_are_ignored(tmp_path: Path) -> None:
    router = RouterProcess(["--cluster-secret", SECRET], tmp_path / "router.log").start()
    p = start_instance("prefill", tmp_path, [*FLAGS, "--register-with", router.url])
    d = start_instance("decode", tmp_path, [*FLAGS, "--register-with", router.url])
    try:
        p.wait_ready()
        d.wait_ready()
        router.wait_ready()  # P and D joined: their heartbeats carry the secret
        prompt = {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
        status, out = completion(router.url, prompt)
        assert status == 200 and out["usage"]["completion_tokens"] == 4, out  # P and D share the secret
        for server in (p, d):
            address = httpx.get(f"{server.url}/v1/pd/info").json()["control_address"]
            done, abort = encode(KVDone(room="forged", first_token=1)), encode(KVAbort(room="forged", reason="x"))
            _push(address, [done])
            _push(address, [abort, authenticator("another-secret", abort)])
            _wait_for(
                lambda s=server: REFUSED_BAD_MAC in s.log_text(), 30, f"no refusal in the log:\n{server.log_tail()}"
            )
            log = server.log_text()
            assert f"refusing a control message from 127.0.0.1: {REFUSED_NO_MAC}" in log
            assert f"refusing a control message from 127.0.0.1: {REFUSED_BAD_MAC}" in log
            assert httpx.get(f"{server.url}/health").status_code == 200
        status, again = completion(router.url, prompt)
        assert status == 200 and again["choices"][0]["text"] == out["choices"][0]["text"], again
    finally:
        stop_all(router, p, d)


def test_an_exposed_control_socket_without_a_secret_refuses_to_start() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pdserve.cli", "serve", "--role", "decode", "--control-host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "PDSERVE_CLUSTER_SECRET"},
    )
    assert done.returncode == 2, done.stderr
    assert "--control-host 0.0.0.0 opens the KV control socket beyond loopback" in done.stderr
    assert "--cluster-secret" in done.stderr
