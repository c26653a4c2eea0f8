"""PD through the storage pool (--kv-transfer storage): P writes every prompt block to the pool, D reads them.

Engine level (in-process P and D cores, tiny random model): equality with the mixed path over a real
Mooncake master, and blocks removed from a file pool between P's write and D's read (fail: 502
kv_load_failed naming the count; recompute: the mixed path's tokens). Through the router on the
default model: completions and chat, streaming and not, equal the mixed path; TP=2; a conversation's
second turn computes only its new tokens on P; the Mooncake master killed mid-run (fail: a quick 502,
recompute: the right output; no hang, no leaked block).
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytest.register_assert_rewrite("server_fixtures", "pd_fixtures")

from pd_fixtures import (  # noqa: E402
    MAX_TOKENS,
    RouterProcess,
    answers,
    start_instance,
    start_pd,
    stop_all,
    tp2_pd_equals_mixed,
    wait_all_free,
)
from server_fixtures import API_KEY, ServerProcess, free_port, metrics  # noqa: E402
from test_pd_engine import TINY, greedy, run_mixed, run_pd  # noqa: E402

from pdserve.config import DisaggConfig, make_engine_config  # noqa: E402
from pdserve.engine.core import EngineCore  # noqa: E402
from pdserve.messages import TransferHandle  # noqa: E402
from pdserve.store.master import MasterProcess  # noqa: E402

pytest_plugins = ["server_fixtures"]

BLOCK = 16
SENT = 'pdserve_kv_transfer_bytes_total{direction="send"}'
RECV = 'pdserve_kv_transfer_bytes_total{direction="recv"}'
HIT = 'pdserve_prefix_cache_hit_tokens_total{{tier="{}"}}'


@pytest.fixture()
def master() -> Iterator[MasterProcess]:
    with MasterProcess(port=free_port(), metadata_port=free_port()) as m:
        yield m


def store_flags(master: MasterProcess) -> list[str]:
    # short store timeouts, so that a dead master is noticed within seconds
    options = json.dumps(master.store_config() | {"timeout_s": 3.0, "cooldown_s": 2.0})
    return ["--kv-transfer", "storage", "--kv-store", "mooncake", "--kv-store-config", options]


# ---- engine level ------------------------------------------------------------------------------------------


def storage_core(role: str, store: dict[str, object], **disagg: object) -> EngineCore:
    return EngineCore(
        make_engine_config(
            **TINY,
            **store,
            num_host_blocks=64,  # type: ignore[arg-type]
            disagg=DisaggConfig(role=role, kv_transfer="storage", **disagg),
        )
    )  # type: ignore[arg-type]


def prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 400) for _ in range(n)] for n in lengths]


def assert_free(*cores: EngineCore) -> None:
    for _ in range(3):  # the finished requests' pool writes ride the next steps
        for core in cores:
            core.step()
    for core in cores:
        core.check_integrity()
        assert core.kv.num_free_blocks == core.kv.num_blocks
        assert not core.kv._holds and not core.is_waiting_on_peers


def test_engine_storage_over_mooncake_equals_mixed(master: MasterProcess) -> None:
    store = {"kv_store": "mooncake", "kv_store_config": master.store_config()}
    mixed = EngineCore(make_engine_config(**TINY))  # type: ignore[arg-type]
    p = storage_core("prefill", store, kv_dest_wait=0.0)
    d = storage_core("decode", store)
    try:
        batch = prompts(0, (1, 5, 16, 17, 33, 64, 100, 47))  # whole blocks, partial ones, one token
        want = run_mixed(mixed, batch)
        assert run_pd(p, d, batch) == want
        assert run_pd(p, d, batch, d_first=False) == want  # the same prompts: P's writes find them present
        late = prompts(1, (40, 7))
        assert run_pd(p, d, late, stagger=True) == run_mixed(mixed, late)  # KVDest after P's write
        assert_free(p, d)
        tp, td = p.stats().kv_transfer, d.stats().kv_transfer
        assert tp.num_transfers == td.num_transfers == 2 * len(batch) + len(late)
        assert tp.bytes_sent > 0 and td.bytes_received >= tp.bytes_sent
        assert not tp.failures and not td.failures
        assert d.stats().num_prompt_tokens == 0  # D computed no prompt token
    finally:
        for core in (mixed, p, d):
            core.shutdown()


def run_pd_errors(p: EngineCore, d: EngineCore, batch: list[list[int]], remove: Path) -> dict[str, object]:
    """P prefills and writes first; then the pool files under `remove` are deleted; then D asks.
    Returns D's tokens (a list) or its error (a RequestError) per request."""
    for i, prompt in enumerate(batch):
        p.add_request(f"p{i}", prompt, greedy(), TransferHandle(room=f"room{i}", peer=d.control_address))
    deadline = time.monotonic() + 60
    assert p.pd is not None and p.pd.prefill is not None
    outgoing = p.pd.prefill._by_room
    while len(outgoing) < len(batch) or not all(out.is_written for out in outgoing.values()):
        assert time.monotonic() < deadline, "P did not write the prompts"
        p.step()
    for path in remove.rglob("*"):
        if path.is_file() and path.parent.name != "tmp":
            path.unlink()
    for i, prompt in enumerate(batch):
        d.add_request(f"r{i}", prompt, greedy(), TransferHandle(room=f"room{i}", peer=p.control_address))
    out: dict[str, object] = {}
    finished: set[str] = set()
    while len(finished) < len(batch) or p.is_waiting_on_peers or d.is_waiting_on_peers:
        assert time.monotonic() < deadline, "PD run hung"
        p.step()
        for u in d.step():
            if u.error is not None:
                out[u.request.req_id] = u.error
            else:
                out.setdefault(u.request.req_id, []).extend(u.new_token_ids)  # type: ignore[attr-defined]
            if u.finished:
                finished.add(u.request.req_id)
        time.sleep(0.001)
    return out


@pytest.mark.parametrize("policy", ["fail", "recompute"])
def test_engine_storage_blocks_missing_from_the_pool(policy: str, tmp_path: Path) -> None:
    store = {"kv_store": "file", "kv_store_config": {"path": str(tmp_path / "pool")}}
    mixed = EngineCore(make_engine_config(**TINY))  # type: ignore[arg-type]
    p = storage_core("prefill", store)
    d = storage_core("decode", store, kv_load_failure_policy=policy)
    try:
        batch = prompts(2, (40, 9))  # 3 blocks (2 full, 8 tokens), 1 partial block
        got = run_pd_errors(p, d, batch, tmp_path / "pool")
        if policy == "fail":
            for req_id, blocks in (("r0", 3), ("r1", 1)):
                error = got[req_id]
                assert error.status == 502 and error.code == "kv_load_failed", error  # type: ignore[attr-defined]
                assert f"{blocks} of the prompt's {blocks} KV blocks were missing" in error.message  # type: ignore[attr-defined]
            assert d.stats().kv_transfer.failures == {"load_failed": 2}
        else:
            assert got == run_mixed(mixed, batch)
            t = d.stats().kv_transfer
            assert t.num_load_recomputes == 2 and t.num_recomputed_tokens == 49
            assert d.stats().num_prompt_tokens == 49  # D prefilled both prompts itself
        assert_free(p, d)
    finally:
        for core in (mixed, p, d):
            core.shutdown()


# ---- through the router, the default model -----------------------------------------------------------------


def check_after(p: ServerProcess, d: ServerProcess, num_requests: int) -> None:
    wait_all_free(p.url)
    wait_all_free(d.url)
    mp, md = metrics(p.url), metrics(d.url)
    assert mp[SENT] > 0 and md[RECV] >= mp[SENT]  # a prompt sent twice is written once
    assert mp["pdserve_kv_transfer_seconds_count"] == md["pdserve_kv_transfer_seconds_count"] == num_requests
    assert md["pdserve_prompt_tokens_total"] == 0  # D computed no prompt token: all of it came from the pool
    assert mp['pdserve_kv_transfer_pool_seconds_total{op="put"}'] > 0
    assert md['pdserve_kv_transfer_pool_seconds_total{op="get"}'] > 0
    for m in (mp, md):
        assert m["pdserve_kv_store_errors_total"] == 0
        assert sum(v for k, v in m.items() if k.startswith("pdserve_kv_transfer_failures_total")) == 0


def wait_store_put(url: str, above: float, timeout_s: float = 30) -> None:
    """Wait until the instance's pool writes passed `above` bytes (D writes a finished request's blocks
    in the step after its last token)."""
    deadline = time.monotonic() + timeout_s
    while metrics(url)['pdserve_kv_store_bytes_total{op="put"}'] <= above:
        assert time.monotonic() < deadline, "the decode instance wrote nothing to the pool at finish"
        time.sleep(0.2)


def check_multi_turn(p: ServerProcess, d: ServerProcess, router: RouterProcess, default_hf_dir: Path) -> None:
    """A conversation's second turn (turn 1's prompt + its answer + a new message) computes only its new
    tokens on P: the rest comes from P's own cache and, past turn 1's prompt, from the blocks D wrote to
    the pool when turn 1 finished."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_hf_dir)
    # a prompt the model continues with plain text for all 40 tokens
    turn1 = tokenizer.encode(
        "Once upon a time, in a small village by the sea, there lived an old lighthouse keeper named",
        add_special_tokens=False,
    )
    put_before = metrics(d.url)['pdserve_kv_store_bytes_total{op="put"}']
    r = httpx.post(
        f"{router.url}/v1/completions", timeout=180, json={"prompt": turn1, "max_tokens": 40, "temperature": 0}
    )
    assert r.status_code == 200, r.text
    out1 = r.json()
    num_out = out1["usage"]["completion_tokens"]
    output_ids = tokenizer.encode(out1["choices"][0]["text"], add_special_tokens=False)
    # the greedy text tokenizes back to as many tokens as were generated, so the next prompt continues them
    assert num_out == 40 and len(output_ids) == num_out, (len(output_ids), out1)
    wait_store_put(d.url, put_before)  # D wrote prompt + output blocks
    before = metrics(p.url)
    turn2 = turn1 + output_ids + tokenizer.encode(" And then what happened next?", add_special_tokens=False)
    r = httpx.post(
        f"{router.url}/v1/completions", timeout=180, json={"prompt": turn2, "max_tokens": 8, "temperature": 0}
    )
    assert r.status_code == 200, r.text
    after = metrics(p.url)
    # D computed KV for turn 1's prompt and all its output tokens but the last; P may reuse the full blocks
    # of that, except the block holding turn 2's last token (whose logits P needs)
    reusable = min((len(turn1) + num_out - 1) // BLOCK, (len(turn2) - 1) // BLOCK) * BLOCK
    computed = after["pdserve_prompt_tokens_total"] - before["pdserve_prompt_tokens_total"]
    hits = {tier: after[HIT.format(tier)] - before[HIT.format(tier)] for tier in ("device", "host", "pool")}
    assert computed == len(turn2) - reusable, (computed, hits, len(turn1), num_out, len(turn2))
    assert sum(hits.values()) == reusable
    # the blocks past turn 1's prompt were computed only by D: P found them in the pool
    assert hits["pool"] >= reusable - (len(turn1) // BLOCK) * BLOCK > 0, hits
    assert computed < len(turn2) - len(turn1) - len(output_ids) + BLOCK  # only the new tokens (block-rounded)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_storage_1p1d_equals_mixed_then_a_second_turn_reuses_the_pool(
    server: ServerProcess, master: MasterProcess, tmp_path: Path, default_hf_dir: Path
) -> None:
    flags = store_flags(master)
    p, d, router = start_pd(
        tmp_path,
        [*flags, "--max-num-batched-tokens", "32", "--max-model-len", "2048"],
        [*flags, "--max-model-len", "2048"],
    )
    try:
        want = asyncio.run(answers(server.url, {"Authorization": f"Bearer {API_KEY}"}))
        got = asyncio.run(answers(router.url, {}))
        assert got == want
        assert all(tokens for _, tokens in want) and any(len(t) == MAX_TOKENS for _, t in want)
        check_after(p, d, len(want))
        check_multi_turn(p, d, router, default_hf_dir)
        wait_all_free(p.url)
        wait_all_free(d.url)
    finally:
        stop_all(router, p, d)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_storage_1p1d_tp2_equals_mixed_tp2(master: MasterProcess, tmp_path: Path, default_hf_dir: Path) -> None:
    """TP=2 on P and D: per-rank pool objects."""
    tp2_pd_equals_mixed(tmp_path, default_hf_dir, store_flags(master), check_after)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_master_killed_mid_run(master: MasterProcess, tmp_path: Path) -> None:
    """One P, two D's (policy fail, policy recompute) behind two routers. After the master dies, a request
    through the fail pair is a quick 502 kv_load_failed; through the recompute pair it is served right.
    Nothing hangs; every block comes back on all three."""
    flags = [*store_flags(master), "--max-model-len", "1024"]
    p = start_instance("prefill", tmp_path, flags)
    d_fail = start_instance("decode", tmp_path, flags)
    d_rec = start_instance("decode", tmp_path, [*flags, "--kv-load-failure-policy", "recompute"])
    routers: list[RouterProcess] = []
    try:
        for s in (p, d_fail, d_rec):
            s.wait_ready()
        for d, name in ((d_fail, "fail"), (d_rec, "recompute")):
            routers.append(
                RouterProcess(["--prefill", p.url, "--decode", d.url], tmp_path / f"router-{name}.log")
                .start()
                .wait_ready()
            )
        prompts_ = [
            "Explain how a bicycle works, step by step. " * 4,
            "List the planets of the solar system. " * 4,
            "Why is the sky blue? Answer in detail. " * 4,
        ]
        # the reference: P answering plain requests (the mixed path)
        want = [
            httpx.post(
                f"{p.url}/v1/completions", timeout=120, json={"prompt": q, "max_tokens": 16, "temperature": 0}
            ).json()["choices"][0]["text"]
            for q in prompts_
        ]

        def ask(router: RouterProcess, prompt: str, stream: bool = False) -> httpx.Response:
            return httpx.post(
                f"{router.url}/v1/completions",
                timeout=120,
                json={"prompt": prompt, "max_tokens": 16, "temperature": 0, "stream": stream},
            )

        r = ask(routers[0], prompts_[0])
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want[0], r.text
        assert master._proc is not None
        master._proc.send_signal(signal.SIGKILL)
        master._proc.wait(timeout=10)

        started = time.monotonic()
        r = ask(routers[0], prompts_[1])
        elapsed = time.monotonic() - started
        assert r.status_code == 502, r.text
        error = r.json()["error"]
        assert error["code"] == "kv_load_failed", error
        assert "of the prompt's" in error["message"] and "--kv-load-failure-policy recompute" in error["message"]
        assert elapsed < 20, f"the 502 took {elapsed:.1f} s"
        r = ask(routers[0], prompts_[1], stream=True)
        assert r.status_code == 502 and r.json()["error"]["code"] == "kv_load_failed", r.text

        for i in (1, 2):
            r = ask(routers[1], prompts_[i])
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == want[i]
        m = metrics(d_rec.url)
        assert m["pdserve_kv_load_recomputes_total"] == 2
        assert m['pdserve_kv_transfer_failures_total{reason="load_failed"}'] == 2
        assert metrics(p.url)['pdserve_kv_transfer_failures_total{reason="write_error"}'] >= 3
        for s in (p, d_fail, d_rec):
            wait_all_free(s.url)
            assert httpx.get(f"{s.url}/health", timeout=10).status_code == 200
    finally:
        stop_all(*routers, p, d_fail, d_rec)
