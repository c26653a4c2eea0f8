"""The pool tier through a real Mooncake master, between real `pdserve serve` processes.

1. Instance A serves a long prompt; instance B, another process on the same
   master, serves it again and computes only the prompt's last block (its
   metrics say so) and answers the same tokens.
2. The master is killed mid-run: requests still complete through recompute,
   with the same tokens; store errors are counted; nothing hangs or crashes.
"""

from __future__ import annotations

import json
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import require_module  # noqa: E402

require_module("mooncake.store")
pytest.register_assert_rewrite("server_fixtures")  # before the import below: its asserts explain failures

from server_fixtures import ServerProcess, assert_clean_exit, free_port, wait_idle  # noqa: E402

from pdserve.store.master import MasterProcess  # noqa: E402

pytest_plugins = ["server_fixtures"]

BLOCK = 16
HIT_POOL = 'pdserve_prefix_cache_hit_tokens_total{tier="pool"}'
# a small device tier and host tier, so that a repeated prompt is found only in the pool
FLAGS = ["--max-model-len", "512", "--num-blocks", "40", "--num-host-blocks", "16", "--kv-store", "mooncake"]


@pytest.fixture()
def master() -> Iterator[MasterProcess]:
    with MasterProcess(port=free_port(), metadata_port=free_port()) as m:
        yield m


def _start(master: MasterProcess, tmp_path: Path, name: str, extra: list[str] | None = None) -> ServerProcess:
    options = json.dumps(master.store_config() | {"timeout_s": 3.0, "cooldown_s": 2.0})
    return ServerProcess([*FLAGS, "--kv-store-config", options, *(extra or [])], tmp_path / f"{name}.log").start()


def _complete(server: ServerProcess, prompt: list[int], max_tokens: int = 8) -> str:
    r = httpx.post(
        f"{server.url}/v1/completions",
        timeout=120,
        json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True},
    )
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == max_tokens
    return str(choice["text"])


def _settle(server: ServerProcess) -> dict[str, float]:
    """Idle, and the finished requests' pool writes sent (they ride the step after the finish)."""
    wait_idle(server.url)
    time.sleep(0.5)
    return wait_idle(server.url)


def _prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 49152) for _ in range(n)]


@pytest.mark.timeout(600)
def test_second_instance_computes_only_the_last_block(master: MasterProcess, tmp_path: Path) -> None:
    a = _start(master, tmp_path, "a")
    b = _start(master, tmp_path, "b")
    try:
        a.wait_ready()
        b.wait_ready()
        prompt = _prompt(1, 7 * BLOCK + 5)  # 7 full blocks and 5 tokens
        text_a = _complete(a, prompt)
        after_a = _settle(a)
        assert after_a['pdserve_kv_store_bytes_total{op="put"}'] > 0
        before_b = _settle(b)
        text_b = _complete(b, prompt)
        after_b = _settle(b)
        assert text_b == text_a
        hit = after_b[HIT_POOL] - before_b.get(HIT_POOL, 0.0)
        computed = after_b["pdserve_prompt_tokens_total"] - before_b["pdserve_prompt_tokens_total"]
        assert hit == 7 * BLOCK, after_b
        assert computed == 5, after_b  # only the last (partial) block
        assert after_b['pdserve_kv_store_bytes_total{op="get"}'] > 0
        assert after_b["pdserve_kv_store_errors_total"] == 0

        exact = _prompt(2, 4 * BLOCK)  # a prompt of whole blocks: a full hit still computes its last block
        text_a = _complete(a, exact)
        _settle(a)
        before = _settle(b)
        assert _complete(b, exact) == text_a
        after = _settle(b)
        assert after[HIT_POOL] - before[HIT_POOL] == 3 * BLOCK
        assert after["pdserve_prompt_tokens_total"] - before["pdserve_prompt_tokens_total"] == BLOCK
    finally:
        for server in (a, b):
            assert_clean_exit(server, *server.stop())


@pytest.mark.timeout(600)
def test_killing_the_master_mid_run_falls_back_to_recompute(master: MasterProcess, tmp_path: Path) -> None:
    server = _start(master, tmp_path, "s")
    try:
        server.wait_ready()
        prompts = [_prompt(10 + i, 9 * BLOCK + 7) for i in range(6)]  # 10 blocks each
        first = [_complete(server, p) for p in prompts[:3]]
        assert _settle(server)['pdserve_kv_store_bytes_total{op="put"}'] > 0
        assert master._proc is not None
        master._proc.send_signal(signal.SIGKILL)
        master._proc.wait(timeout=10)
        started = time.monotonic()
        # three new prompts (their writes fail), then the first three again: the 40 device and 16 host blocks
        # no longer hold them and the pool cannot answer, so they are recomputed
        later = [_complete(server, p) for p in prompts[3:] + prompts[:3]]
        elapsed = time.monotonic() - started
        m = _settle(server)
        assert later[3:] == first
        assert m["pdserve_kv_store_errors_total"] > 0, m
        assert elapsed < 120, f"six requests took {elapsed:.0f} s with the master gone"
        r = httpx.get(f"{server.url}/health", timeout=10)
        assert r.status_code == 200
    finally:
        assert_clean_exit(server, *server.stop())


@pytest.mark.timeout(180)
def test_unreachable_master_stops_the_server_with_a_clear_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    dead = {"master": f"127.0.0.1:{free_port()}", "metadata": f"http://127.0.0.1:{free_port()}/metadata"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pdserve.cli",
            "serve",
            "--port",
            str(free_port()),
            *FLAGS,
            "--kv-store-config",
            json.dumps(dead),
        ],
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("pdserve: error: the engine failed to start: "), last
    assert f"cannot reach the Mooncake master at {dead['master']}" in last and "pdserve store start" in last
