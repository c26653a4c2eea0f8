"""PD failure handling with real processes: D's reservation, a killed D, a killed P, D's receive
deadline, a client abort between P and D, and a restarted instance taken back by the router. Each is
followed by free blocks == total on the survivors."""

from __future__ import annotations

import asyncio
import glob
import time
from pathlib import Path

import httpx
import pytest

pytest.register_assert_rewrite("server_fixtures", "pd_fixtures")

from pd_fixtures import RouterProcess, completion, kill_instance, start_instance, wait_all_free  # noqa: E402
from server_fixtures import ServerProcess, metrics  # noqa: E402

pytest_plugins = ["server_fixtures"]

pytestmark = pytest.mark.slow
SMALL = ["--max-model-len", "2048", "--num-blocks", "256"]


def router_for(tmp_path: Path, p: ServerProcess, d: ServerProcess) -> RouterProcess:
    return RouterProcess(["--prefill", p.url, "--decode", d.url], tmp_path / "router.log").start().wait_ready()


def ready(*servers: ServerProcess) -> None:
    for s in servers:
        s.wait_ready()


def long_prompt(n: int, start: int = 1000) -> list[int]:
    return [start + (i * 7) % 3000 for i in range(n)]


def test_decode_reserve_holds_new_requests_back(tmp_path: Path) -> None:
    """D's 40 blocks hold 4 requests of 60 + 100 tokens exactly; with their future tokens reserved, a fifth
    waits and is refused after the admission timeout (503 no_capacity), and nobody is preempted."""
    p = start_instance("prefill", tmp_path, SMALL)
    d = start_instance("decode", tmp_path, ["--max-model-len", "512", "--num-blocks", "40", "--admission-timeout", "1"])
    ready(p, d)
    router = router_for(tmp_path, p, d)
    body = {"max_tokens": 100, "temperature": 0, "ignore_eos": True}

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=300) as client:
            first = [
                asyncio.create_task(
                    client.post(f"{router.url}/v1/completions", json={**body, "prompt": long_prompt(60, 100 * i)})
                )
                for i in range(4)
            ]
            await asyncio.sleep(1.0)  # the four are decoding
            fifth = await client.post(f"{router.url}/v1/completions", json={**body, "prompt": long_prompt(60, 900)})
            return [*(await asyncio.gather(*first)), fifth]

    try:
        *running, fifth = asyncio.run(run())
        for r in running:
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 100
        if fifth.status_code != 200:  # it may also have fit once a running request finished
            assert fifth.status_code == 503 and fifth.json()["error"]["code"] == "no_capacity", fifth.text
        assert metrics(d.url)["pdserve_preemptions_total"] == 0
        wait_all_free(p.url)
        wait_all_free(d.url)
    finally:
        for part in (router, p, d):
            part.stop()


def test_killed_decode_gives_502_and_a_restarted_one_is_used_again(tmp_path: Path) -> None:
    # random delays before each of P's per-layer send batches stretch the transfer to seconds
    others = set(glob.glob("/dev/shm/pdserve-kv-*"))  # other deployments' on this machine, if any
    p = start_instance("prefill", tmp_path, [*SMALL, "--fault-delay-ms", "150"])
    d = start_instance("decode", tmp_path, SMALL)
    ready(p, d)
    router = router_for(tmp_path, p, d)
    d_files = set(glob.glob("/dev/shm/pdserve-kv-*")) - others
    try:

        async def killed_mid_transfer() -> httpx.Response:
            async with httpx.AsyncClient(timeout=120) as client:
                task = asyncio.create_task(
                    client.post(
                        f"{router.url}/v1/completions",
                        json={"prompt": long_prompt(300), "max_tokens": 8, "temperature": 0},
                    )
                )
                await asyncio.sleep(2.0)
                assert not task.done()
                kill_instance(d)
                return await task

        started = time.monotonic()
        r = asyncio.run(killed_mid_transfer())
        assert r.status_code == 502, r.text
        assert r.json()["error"]["code"] == "instance_unavailable"
        assert time.monotonic() - started < 30
        wait_all_free(p.url, 60)  # P finishes its sends into the dead peer's memory, then frees
        assert httpx.get(f"{router.url}/health").status_code == 503  # no healthy decode instance
        r = httpx.post(f"{router.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "instance_unavailable", r.text

        d2 = start_instance("decode", tmp_path, SMALL, port=d.port).wait_ready()
        # the new decode instance swept the killed one's shared-memory KV files
        assert not (d_files & set(glob.glob("/dev/shm/pdserve-kv-*")))
        deadline = time.monotonic() + 30
        while httpx.get(f"{router.url}/health").status_code != 200:
            assert time.monotonic() < deadline, "the router did not take the restarted decode instance back"
            time.sleep(0.2)
        status, out = completion(router.url, {"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0})
        assert status == 200 and out["usage"]["completion_tokens"] == 6, out
        wait_all_free(p.url)
        wait_all_free(d2.url)
        d2.stop()
    finally:
        for part in (router, p):
            part.stop()


def test_deadline_abort_and_killed_prefill(tmp_path: Path) -> None:
    p = start_instance("prefill", tmp_path, [*SMALL, "--max-num-batched-tokens", "64"])
    d = start_instance("decode", tmp_path, [*SMALL, "--kv-transfer-timeout", "3"])
    ready(p, d)
    router = router_for(tmp_path, p, d)
    try:
        # D's receive deadline: a prefill instance that never answers
        started = time.monotonic()
        status, out = completion(
            d.url,
            {
                "prompt": "Hello there",
                "max_tokens": 4,
                "kv_transfer_params": {"room": "lonely", "peer": "tcp://127.0.0.1:9"},
            },
        )
        assert status == 502 and out["error"]["code"] == "kv_transfer_timeout", out
        assert 3 <= time.monotonic() - started < 15
        wait_all_free(d.url)

        # the client goes away between P and D: both sides let go
        async def abandon() -> None:
            async with httpx.AsyncClient(timeout=60) as client:
                task = asyncio.create_task(
                    client.post(
                        f"{router.url}/v1/completions",
                        json={"prompt": long_prompt(1500), "max_tokens": 8, "stream": True},
                    )
                )
                await asyncio.sleep(1.0)
                task.cancel()

        asyncio.run(abandon())
        wait_all_free(p.url)
        wait_all_free(d.url)
        assert metrics(p.url)["pdserve_num_requests_running"] == 0

        # P killed mid-prefill (1500 tokens in chunks of 64): the client gets a 502, D frees its blocks
        async def killed_mid_prefill() -> httpx.Response:
            async with httpx.AsyncClient(timeout=120) as client:
                task = asyncio.create_task(
                    client.post(
                        f"{router.url}/v1/completions", json={"prompt": long_prompt(1500, 2000), "max_tokens": 8}
                    )
                )
                await asyncio.sleep(1.0)
                assert not task.done()
                kill_instance(p)
                return await task

        started = time.monotonic()
        r = asyncio.run(killed_mid_prefill())
        assert r.status_code == 502, r.text
        assert r.json()["error"]["code"] in ("instance_unavailable", "kv_transfer_timeout")
        assert time.monotonic() - started < 15
        wait_all_free(d.url, 20)
    finally:
        for part in (router, p, d):
            part.stop()
