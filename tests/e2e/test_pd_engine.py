"""PD direct mode at the engine level: a prefill EngineCore and a decode EngineCore in one process,
paired through their real control sockets, the KV moved by the real transfer engine (shared memory)
between real worker ranks. Outputs must equal the mixed path token for token; blocks return to total.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from pdserve.config import DisaggConfig, make_engine_config
from pdserve.engine.core import EngineCore
from pdserve.messages import TransferHandle
from pdserve.request import SamplingParams

TINY = dict(model="tiny", load_format="dummy", max_model_len=512, num_blocks=96)


def greedy(max_tokens: int = 10) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def run_mixed(core: EngineCore, prompts: list[list[int]], max_tokens: int = 10) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        core.add_request(f"r{i}", p, greedy(max_tokens))
    while core.has_work:
        for u in core.step():
            out.setdefault(u.request.req_id, []).extend(u.new_token_ids)
    return out


def run_pd(
    p_core: EngineCore,
    d_core: EngineCore,
    prompts: list[list[int]],
    max_tokens: int = 10,
    d_first: bool = True,
    stagger: bool = False,
    timeout: float = 120,
) -> dict[str, list[int]]:
    """Add each prompt to both sides (D first or P first; `stagger`: D only after P's prefill is done),
    step both until every decode request finished; return D's tokens."""
    out: dict[str, list[int]] = {}
    finished: set[str] = set()
    late: list[int] = []
    for i, p in enumerate(prompts):
        d_handle = TransferHandle(room=f"room{i}", peer=p_core.control_address)
        p_handle = TransferHandle(room=f"room{i}", peer=d_core.control_address)
        if d_first and not stagger:
            d_core.add_request(f"r{i}", p, greedy(max_tokens), d_handle)
        p_core.add_request(f"p{i}", p, greedy(max_tokens), p_handle)
        if not d_first and not stagger:
            d_core.add_request(f"r{i}", p, greedy(max_tokens), d_handle)
        if stagger:
            late.append(i)
    deadline = time.monotonic() + timeout
    while len(finished) < len(prompts) or p_core.is_waiting_on_peers or d_core.is_waiting_on_peers:
        assert time.monotonic() < deadline, f"PD run hung: {len(finished)} of {len(prompts)} finished"
        for core in (p_core, d_core):
            for u in core.step():
                assert u.error is None, f"{u.request.req_id}: {u.error}"
                if u.request.req_id.startswith("r"):
                    out.setdefault(u.request.req_id, []).extend(u.new_token_ids)
                    if u.finished:
                        finished.add(u.request.req_id)
        if late and not p_core.scheduler.requests:  # P's prefills are over: only now does D ask for the KV
            for i in late:
                d_core.add_request(
                    f"r{i}",
                    prompts[i],
                    greedy(max_tokens),
                    TransferHandle(room=f"room{i}", peer=p_core.control_address),
                )
            late = []
        time.sleep(0.001)
    return out


def assert_all_free(*cores: EngineCore) -> None:
    for core in cores:
        core.check_integrity()
        assert core.kv.num_free_blocks == core.kv.num_blocks


@pytest.fixture(scope="module")
def cores():
    mixed = EngineCore(make_engine_config(**TINY))
    p_core = EngineCore(make_engine_config(**TINY, max_num_batched_tokens=64, disagg=DisaggConfig(role="prefill")))
    d_core = EngineCore(make_engine_config(**TINY, disagg=DisaggConfig(role="decode")))
    yield mixed, p_core, d_core
    for core in (mixed, p_core, d_core):
        core.shutdown()


PROMPTS = [list(range(3, 3 + n)) for n in (1, 15, 16, 17, 40, 130)]


def test_pd_equals_mixed_with_chunked_prefill(cores) -> None:
    mixed, p_core, d_core = cores
    want = run_mixed(mixed, PROMPTS)
    assert run_pd(p_core, d_core, PROMPTS) == want  # 130 tokens in chunks of 64 on P
    assert_all_free(p_core, d_core)
    sent = p_core.stats().kv_transfer
    assert sent.bytes_sent == d_core.stats().kv_transfer.bytes_received > 0
    assert sent.failures == {} and d_core.stats().num_prompt_tokens == 0  # D computed no prompt token


def test_pd_kvdest_after_prefill_and_p_first(cores) -> None:
    mixed, p_core, d_core = cores
    want = run_mixed(mixed, PROMPTS)
    assert run_pd(p_core, d_core, PROMPTS, stagger=True) == want  # P holds its blocks until D asks
    assert_all_free(p_core, d_core)
    assert run_pd(p_core, d_core, PROMPTS, d_first=False) == want
    assert_all_free(p_core, d_core)


def test_pd_prefix_hit_on_p_is_sent_too(cores) -> None:
    mixed, p_core, d_core = cores
    prompt = [list(range(200, 280))]
    want = run_mixed(mixed, prompt)
    hits_before = p_core.stats().prefix_hit_tokens_device
    assert run_pd(p_core, d_core, prompt) == want
    assert run_pd(p_core, d_core, prompt) == want  # second time P reuses 64 cached tokens and sends them
    assert p_core.stats().prefix_hit_tokens_device - hits_before == 64
    assert_all_free(p_core, d_core)


def test_decode_refuses_a_prefill_with_another_layout(tmp_path) -> None:
    p_core = EngineCore(make_engine_config(**{**TINY, "block_size": 32}, disagg=DisaggConfig(role="prefill")))
    d_core = EngineCore(make_engine_config(**TINY, disagg=DisaggConfig(role="decode")))
    try:
        d_core.add_request("r0", [1, 2, 3], greedy(), TransferHandle(room="x", peer=p_core.control_address))
        p_core.add_request("p0", [1, 2, 3], greedy(), TransferHandle(room="x", peer=d_core.control_address))
        errors = []
        deadline = time.monotonic() + 30
        while not errors and time.monotonic() < deadline:
            for core in (p_core, d_core):
                errors += [u.error for u in core.step() if u.error is not None]
            time.sleep(0.002)
        assert errors and all(e.status == 502 and e.code == "kv_transfer_failed" for e in errors)
        assert "layout mismatch" in errors[0].message
        time.sleep(0.05)
        d_core.step()
        assert_all_free(p_core, d_core)
    finally:
        p_core.shutdown()
        d_core.shutdown()


def test_tp2_send_batches_identical_under_random_delays(tmp_path: Path) -> None:
    """The deadlock regression (FastDeploy PR #8034): TP=2 on both sides, random delays before every send
    batch on each rank and before every KVDest; >= 200 requests; no hang, and each P rank's sequence of
    send batches is identical to the other's."""
    trace = tmp_path / "trace"
    trace.mkdir()
    tp2 = dict(TINY, tensor_parallel_size=2, num_blocks=256, max_num_batched_tokens=48)
    mixed = EngineCore(make_engine_config(**tp2))  # dummy weights are drawn per TP layout
    p_core = EngineCore(
        make_engine_config(**tp2, disagg=DisaggConfig(role="prefill", fault_delay_ms=3, send_trace_dir=str(trace)))
    )
    d_core = EngineCore(make_engine_config(**tp2, disagg=DisaggConfig(role="decode", fault_delay_ms=2)))
    rng = random.Random(7)
    prompts = [[rng.randrange(1, 500) for _ in range(rng.randrange(1, 70))] for _ in range(200)]
    try:
        want = run_mixed(mixed, prompts, max_tokens=3)
        got = run_pd(p_core, d_core, prompts, max_tokens=3, timeout=600)
        assert got == want
        assert_all_free(p_core, d_core)
    finally:
        for core in (mixed, p_core, d_core):
            core.shutdown()
    rank0 = (trace / "sends-rank0.jsonl").read_text().splitlines()
    rank1 = (trace / "sends-rank1.jsonl").read_text().splitlines()
    assert len(rank0) > 200 and rank0 == rank1
    rooms = {room for line in rank0 for room in json.loads(line)["rooms"]}
    assert rooms == {f"room{i}" for i in range(200)}


def test_pd_over_the_mooncake_transfer_engine() -> None:
    """--kv-transfer-engine mooncake on both sides: D's cache is registered with the Mooncake Transfer
    Engine (TCP here) instead of living in shared memory, and P writes it through Mooncake."""
    from helpers import require_module

    require_module("mooncake")
    mixed = EngineCore(make_engine_config(**TINY))
    p_core = EngineCore(
        make_engine_config(
            **TINY, max_num_batched_tokens=64, disagg=DisaggConfig(role="prefill", transfer_engine="mooncake")
        )
    )
    d_core = EngineCore(make_engine_config(**TINY, disagg=DisaggConfig(role="decode", transfer_engine="mooncake")))
    try:
        assert [r.engine for r in d_core.executor.regions[0]] == ["mooncake"]
        assert run_pd(p_core, d_core, PROMPTS) == run_mixed(mixed, PROMPTS)
        assert_all_free(p_core, d_core)
        assert p_core.stats().kv_transfer.bytes_sent == d_core.stats().kv_transfer.bytes_received > 0
    finally:
        for core in (mixed, p_core, d_core):
            core.shutdown()


def test_without_mooncake_auto_falls_back_to_shared_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain `pip install -e .` has no Mooncake: auto runs shared memory only, and asking for mooncake is a
    clear error naming the extra to install."""
    import sys

    monkeypatch.setitem(sys.modules, "mooncake", None)
    monkeypatch.setitem(sys.modules, "mooncake.engine", None)
    small = dict(TINY, num_blocks=32)
    d_core = EngineCore(make_engine_config(**small, disagg=DisaggConfig(role="decode")))
    try:
        assert [r.engine for r in d_core.executor.regions[0]] == ["shm"]
    finally:
        d_core.shutdown()
    with pytest.raises(ValueError, match=r"mooncake cannot start.*pdserve\[mooncake\]"):
        EngineCore(make_engine_config(**small, disagg=DisaggConfig(role="decode", transfer_engine="mooncake")))
