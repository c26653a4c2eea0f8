"""Instances join a running router on their own: `pdserve serve --register-with ROUTER_URL` posts
/register with heartbeats, and a clean stop unregisters."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

pytest.register_assert_rewrite("server_fixtures", "pd_fixtures")

from pd_fixtures import RouterProcess, completion, start_instance  # noqa: E402

pytest_plugins = ["server_fixtures"]


def wait_for(check, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def _health(url: str) -> int | None:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code
    except httpx.TransportError:
        return None


@pytest.mark.slow
def test_instances_register_with_a_running_router(tmp_path: Path) -> None:
    router = RouterProcess([], tmp_path / "router.log").start()
    flags = ["--max-model-len", "1024", "--num-blocks", "128", "--register-with", router.url]
    p = start_instance("prefill", tmp_path, flags)
    d = start_instance("decode", tmp_path, flags)
    try:
        wait_for(lambda: _health(router.url) is not None, 60, "the router did not start")
        assert _health(router.url) == 503  # nobody has joined yet
        p.wait_ready()
        d.wait_ready()
        wait_for(lambda: httpx.get(f"{router.url}/health").status_code == 200, 30, "P and D did not join the router")
        status, out = completion(router.url, {"prompt": "The capital of France is", "max_tokens": 5, "temperature": 0})
        assert status == 200 and out["usage"]["completion_tokens"] == 5, out
        d.stop()  # a clean stop unregisters: the router has no decode instance left
        wait_for(lambda: httpx.get(f"{router.url}/health").status_code == 503, 15, "D was not unregistered")
    finally:
        for part in (p, d, router):
            part.stop()
