"""The PD control plane in storage mode, without a model: P plans a PoolSend (stage every prompt block into
host blocks, write them to the pool) in the step that computes a prompt's last chunk and sends KVDone once
every rank reported and KVDest came; D reads the prompt's blocks from the pool on KVDone (a fake reader
here) and starts decoding, or with blocks missing fails (502 kv_load_failed) or recomputes them.

A real Scheduler and KVCacheManager with a host tier and a pool on each side, a fake clock and a fake
ControlChannel; exact block ids, keys and messages, check_integrity() after every operation, and device
blocks, holds and host references all back to zero at the end."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

# the direct-mode control tests' fakes, constants and helpers (pytest's default import mode puts tests/unit on sys.path)
import test_disagg_control as control
from test_disagg_control import (
    BS,
    D_ADDR,
    FP,
    P_ADDR,
    PROMPT,
    REGIONS,
    Clock,
    FakeChannel,
    d_admit,
    d_control,
    dest,
    done_ok,
    p_execute,
    p_fail,
    p_request,
    refuse_dest,
)

from pdserve.config import DisaggConfig, SchedulerConfig
from pdserve.disagg.control import prompt_digest
from pdserve.disagg.prefill import WRITE_FAILED
from pdserve.disagg.storage import StorageDecode, StoragePrefill, prompt_object_keys
from pdserve.kvcache import KVCacheManager
from pdserve.kvcache.block_pool import BlockPool
from pdserve.kvcache.keys import chain_key, chain_keys
from pdserve.kvcache.manager import PoolLoad
from pdserve.messages import (
    CacheOps,
    ForwardOutput,
    KVAbort,
    KVDest,
    KVDone,
    KVSendReport,
    PoolSend,
    TransferCounters,
    TransferHandle,
)
from pdserve.request import FinishReason, Request, RequestStatus, SamplingParams
from pdserve.scheduler.scheduler import RequestError, RequestUpdate, Scheduler, SchedulerOutput

ROOT = b"pdserve"  # KVCacheManager's default root: P and D name blocks alike
BYTES_PER_OBJECT = 100  # what a fake rank reports per block written
BYTES_PER_BLOCK = 1000  # D: all ranks


def expected_keys(prompt: Sequence[int], root: bytes = ROOT) -> list[str]:
    """The pool names of a prompt's blocks, rebuilt from chain_key alone."""
    names, prev = [], root
    for start in range(0, len(prompt), BS):
        block = list(prompt[start : start + BS])
        prev = chain_key(prev, block)
        names.append(prev.hex() if len(block) == BS else f"{prev.hex()}:partial:{len(block)}")
    return names


KEYS = expected_keys(PROMPT)


def host_refs(kv: KVCacheManager) -> list[int]:
    assert kv.host is not None
    return [kv.host.ref_count(b) for b in range(kv.host.num_blocks)]


def assert_no_host_refs(kv: KVCacheManager) -> None:
    assert not any(host_refs(kv)), host_refs(kv)
    assert (
        not kv.tiers._refs_pending
        and not kv.tiers._refs_in_flight
        and not kv.tiers._loading
        and not kv.tiers._held_for_admission
    )


# ---- P ---------------------------------------------------------------------------------


@dataclass
class PEnv(control.PEnv):
    tp_size: int
    plans: list[SchedulerOutput] = field(default_factory=list)


def make_p(
    num_blocks: int = 16, num_host_blocks: int = 16, budget: int = 2048, timeout: float = 60.0, tp_size: int = 1
) -> PEnv:
    kv = KVCacheManager(num_blocks, BS, num_host_blocks=num_host_blocks, has_pool=True)
    scheduler = Scheduler(SchedulerConfig(8, budget), kv, max_model_len=1024)
    control = FakeChannel(P_ADDR)
    clock = Clock()
    side = StoragePrefill(
        kv,
        control,
        FP,
        tp_size,
        timeout,
        clock=clock,
        dest_wait=0.05,  # type: ignore[arg-type]
    )
    return PEnv(kv, scheduler, control, clock, side, tp_size)


def p_add(env: PEnv, req_id: str = "r1", room: str | None = None, prompt: Sequence[int] = PROMPT) -> Request:
    """What PDRole.add and before_step do on P: track the transfer; in storage mode it is ready at once
    (no KVDest is awaited before the prefill)."""
    request = p_request(req_id, prompt)
    env.side.add(request, TransferHandle(room=room or req_id, peer=D_ADDR, mode="storage"))
    assert env.side.take_ready() == [request]
    assert env.side.take_ready() == []
    env.scheduler.add_request(request)
    env.check()
    return request


def p_step(
    env: PEnv, token: int = 7, failed: dict[int, dict[str, str]] | None = None, budget: int | None = None
) -> tuple[list[PoolSend], list[tuple[str, RequestError]]]:
    """One engine step on P (EngineCore._step): schedule, plan the pool sends, execute (fake: every rank
    reports, failing the rooms `failed` names for it), on_output BEFORE scheduler.update; failures are
    finished as the core does."""
    if budget is not None:
        env.set_budget(budget)
    sched = env.scheduler.schedule()
    sched.plan.pool_sends = env.side.plan_pool_sends(sched)
    env.plans.append(sched)
    env.check()
    reports = []
    if sched.plan.pool_sends:
        for rank in range(env.tp_size):
            bad = (failed or {}).get(rank, {})
            num_bytes = BYTES_PER_OBJECT * sum(len(s.keys) for s in sched.plan.pool_sends if s.room not in bad)
            reports.append(
                KVSendReport(rank=rank, num_bytes=num_bytes, failed=dict(bad), seconds_busy=0.5 if rank == 0 else 0.75)
            )
    return sched.plan.pool_sends, p_execute(env, sched, token, reports)


def p_drain(env: PEnv) -> None:
    """Steps the engine core would still run (pending cache ops, held blocks to stage)."""
    for _ in range(5):
        if not (env.scheduler.has_work or env.side.has_sends):
            return
        p_step(env)
    raise AssertionError("P never becomes idle")


def assert_p_idle(env: PEnv) -> None:
    p_drain(env)
    control.assert_p_idle(env)
    assert not env.scheduler.requests
    assert_no_host_refs(env.kv)


def pool_send(device: list[int], host: list[int], keys: list[str] = KEYS, room: str = "r1") -> PoolSend:
    return PoolSend(room=room, device_block_ids=device, host_block_ids=host, keys=keys)


def test_p_storage_request_is_ready_at_once_even_with_dest_wait() -> None:
    env = make_p()
    request = Request("r1", PROMPT, SamplingParams(max_tokens=1, temperature=0))
    env.side.add(request, TransferHandle(room="r1", peer=D_ADDR))
    assert env.side.take_ready() == [request]  # dest_wait is 0.05 s, the clock has not moved


def test_p_chunked_prefill_plans_the_pool_send_in_the_last_chunk_step_dest_first() -> None:
    env = make_p(budget=4)
    request = p_add(env)
    assert env.side.on_control(dest()) == []
    assert env.control.take() == []  # nothing written yet
    assert p_step(env) == ([], [])  # tokens 0..3
    assert p_step(env) == ([], [])  # tokens 4..7
    assert env.control.take() == [] and env.kv.host.num_cached_blocks == 0  # type: ignore[union-attr]
    assert env.kv.block_ids("r1") == [0, 1]  # blocks are allocated chunk by chunk
    env.clock.now += 2.0
    sends, failed = p_step(env, token=42)  # tokens 8..9: the last chunk stages and writes every block
    assert sends == [pool_send([0, 1, 2], [0, 1, 2])]
    assert failed == []
    assert env.control.take() == [done_ok(token=42)]
    assert request.is_finished and request.finish_reason is FinishReason.LENGTH
    assert request.output_token_ids == [42]
    # the staged full blocks stay cached on the host under their keys, the partial one does not
    full = chain_keys(ROOT, PROMPT, BS)
    assert env.kv.host.lookup(full[0]) == 0 and env.kv.host.lookup(full[1]) == 1  # type: ignore[union-attr]
    assert env.kv.host.key_of(2) is None  # type: ignore[union-attr]
    stats = env.side.stats
    assert stats.bytes_sent == 3 * BYTES_PER_OBJECT and stats.num_transfers == 1 and stats.seconds_sum == 0.0
    assert stats.pool_seconds_put == 0.5 and stats.send_seconds_busy == 0.0 and not stats.failures
    assert_p_idle(env)


def test_p_unaligned_chunks_stage_only_with_the_last_one() -> None:
    env = make_p()
    p_add(env)
    env.side.on_control(dest())
    assert p_step(env, budget=3) == ([], [])
    assert p_step(env, budget=6) == ([], [])  # tokens 3..8: every block touched, but the prompt is not done
    assert env.control.take() == []
    assert p_step(env, budget=5) == ([pool_send([0, 1, 2], [0, 1, 2])], [])  # token 9 only
    assert env.control.take() == [done_ok()]
    assert_p_idle(env)


@pytest.mark.parametrize(
    "prompt, device",
    [
        (tuple(range(200, 208)), [0, 1]),  # a multiple of the block size: no partial object
        (tuple(range(200, 204)), [0]),  # exactly one block
        (tuple(range(200, 203)), [0]),  # shorter than a block: only the partial object
        (tuple(range(200, 213)), [0, 1, 2, 3]),  # 3 full blocks and one token
    ],
)
def test_p_pool_send_keys_full_then_partial(prompt: tuple[int, ...], device: list[int]) -> None:
    env = make_p(budget=3)
    p_add(env, prompt=prompt)
    env.side.on_control(dest(block_ids=range(20, 20 + len(device)), prompt=prompt))
    sends: list[PoolSend] = []
    num_steps = 0
    while not sends:
        sends, failed = p_step(env)
        assert failed == []
        num_steps += 1
    assert num_steps == -(-len(prompt) // 3)  # the step of the last chunk
    keys = expected_keys(prompt)
    assert sends == [pool_send(device, list(range(len(device))), keys)]
    assert [":partial:" in k for k in keys] == [i == len(prompt) // BS for i in range(len(device))]
    assert keys == prompt_object_keys(env.kv, Request("x", prompt, SamplingParams()))
    assert env.control.take() == [done_ok()]
    assert_p_idle(env)


def test_p_kvdest_after_the_write_sends_kvdone_on_arrival() -> None:
    env = make_p()
    request = p_add(env)
    env.clock.now += 1.0
    sends, failed = p_step(env, token=9)
    assert sends == [pool_send([0, 1, 2], [0, 1, 2])] and failed == []
    assert env.control.take() == []  # no KVDest yet: nobody to tell
    assert request.is_finished
    # written: no hold is needed, the blocks are back (cached) while the transfer waits for KVDest
    assert not env.kv._holds and env.kv.num_free_blocks == 16
    assert env.side.num_pending == 1 and not env.side.has_sends
    env.clock.now += 2.5
    assert env.side.on_control(dest()) == []
    env.check()
    assert env.control.take() == [done_ok(token=9)]
    assert env.side.num_pending == 0
    assert env.side.stats.num_transfers == 1 and env.side.stats.seconds_sum == 2.5
    assert_p_idle(env)


def test_p_early_kvdest_is_attached_on_add() -> None:
    env = make_p()
    assert env.side.on_control(dest()) == []
    p_add(env)
    assert p_step(env) == ([pool_send([0, 1, 2], [0, 1, 2])], [])
    assert env.control.take() == [done_ok()]
    assert_p_idle(env)


def test_p_write_failure_on_rank_1_only_sends_kvdone_error_and_finishes_the_request_normally() -> None:
    env = make_p(tp_size=2)
    request = p_add(env)
    env.side.on_control(dest(tp_size=2))
    sends, failed = p_step(env, token=5, failed={1: {"r1": "1 of 3 prompt blocks could not be written to the pool"}})
    assert sends == [pool_send([0, 1, 2], [0, 1, 2])]
    assert failed == []  # P does not fail its own request: D's policy decides
    assert env.control.take() == [
        (
            D_ADDR,
            KVDone(
                room="r1",
                status="error",
                code=WRITE_FAILED,
                first_token=5,
                tp_size=2,
                fingerprint=FP,
                error="the prefill instance could not write the prompt's 3 blocks to the KV pool: rank 1: 1 of 3 prompt "
                "blocks could not be written to the pool",
            ),
        )
    ]
    assert WRITE_FAILED == "kv_store_write_failed"
    assert request.is_finished and request.finish_reason is FinishReason.LENGTH and request.output_token_ids == [5]
    assert env.side.stats.failures == {"write_error": 1}
    assert env.side.stats.bytes_sent == 3 * BYTES_PER_OBJECT and env.side.stats.num_transfers == 0
    assert env.side.num_pending == 0
    # not noted as written: freeing the finished request writes its full blocks through as usual, from the
    # host blocks they were staged in
    full = chain_keys(ROOT, PROMPT, BS)
    assert env.kv.tiers._ops.build() == CacheOps(pool_put=[(0, full[0].hex()), (1, full[1].hex())])
    sends, _ = p_step(env)
    assert sends == [] and env.plans[-1].plan.cache_ops.pool_put == [(0, full[0].hex()), (1, full[1].hex())]
    assert_p_idle(env)


def test_p_write_failure_before_kvdest_is_told_when_it_comes() -> None:
    env = make_p()
    p_add(env)
    assert p_step(env, failed={0: {"r1": "store down"}}) == ([pool_send([0, 1, 2], [0, 1, 2])], [])
    assert env.control.take() == []
    assert env.side.num_pending == 1 and not env.kv._holds
    assert env.side.on_control(dest()) == []
    [(to, done)] = env.control.take()
    assert to == D_ADDR and isinstance(done, KVDone)
    assert (done.status, done.code, done.first_token) == ("error", WRITE_FAILED, 7)
    assert done.error.endswith(": rank 0: store down")
    assert_p_idle(env)


def test_p_after_a_successful_write_the_keys_are_known_and_not_written_again() -> None:
    env = make_p()
    p_add(env)
    env.side.on_control(dest())
    p_step(env)
    full = chain_keys(ROOT, PROMPT, BS)
    assert all(k in env.kv.tiers._pool_keys for k in full)
    assert not any(k in env.kv.tiers._pool_keys for k in [chain_key(full[1], PROMPT[8:])])  # no partial key
    # the request finished and was freed in that step: no pool write of the same blocks is recorded
    ops = env.kv.tiers._ops.build()
    assert ops.pool_put == [] and ops.swap_out == []
    assert_p_idle(env)


def test_p_host_tier_busy_holds_the_blocks_and_stages_them_in_a_later_step() -> None:
    env = make_p(num_host_blocks=3)
    a = p_add(env, "a")
    b = p_add(env, "b", prompt=range(300, 310))
    env.side.on_control(dest("a"))
    env.side.on_control(dest("b", prompt=range(300, 310)))
    sends, failed = p_step(env)
    assert sends == [pool_send([0, 1, 2], [0, 1, 2], room="a")] and failed == []  # no host room left for b
    assert a.is_finished and b.is_finished
    assert env.control.take() == [done_ok("a")]
    assert env.kv._holds == {"send:b": [3, 4, 5]}  # b's blocks outlive its request
    assert [env.kv.device.ref_count(x) for x in (3, 4, 5)] == [1, 1, 1]
    assert env.side.has_sends and env.side.num_pending == 1
    staged: list[PoolSend] = []
    for _ in range(3):  # steps with no tokens run for the held blocks
        sends, failed = p_step(env)
        assert failed == []
        if sends:
            staged = sends
            break
        assert env.kv._holds == {"send:b": [3, 4, 5]} and env.control.take() == []
    assert len(staged) == 1
    [send_b] = staged
    assert (send_b.room, send_b.device_block_ids, send_b.keys) == ("b", [3, 4, 5], expected_keys(range(300, 310)))
    assert sorted(send_b.host_block_ids) == [0, 1, 2]
    assert not env.kv._holds  # released once written
    assert env.control.take() == [done_ok("b")]
    assert_p_idle(env)


def p_step_with_the_host_tier_busy() -> PEnv:
    """A lone request on a host tier of 3 blocks, KVDest first; its one prefill step runs while another op of
    the plan being built holds a host block, so its blocks cannot be staged in that step."""
    env = make_p(num_host_blocks=3)
    p_add(env)
    env.side.on_control(dest())
    sched = env.scheduler.schedule()
    held, _ = env.kv.host.allocate(1)  # type: ignore[union-attr]  # another op of this plan uses a host block
    env.kv.tiers._refs_in_flight.extend(held)
    assert env.side.plan_pool_sends(sched) == []
    env.check()
    assert p_execute(env, sched, 7, []) == []  # scheduler.update's end_step: the host block is free again
    return env


def test_p_host_tier_busy_staging_waits_for_the_step_in_flight() -> None:
    """A lone request: the first staging attempt comes while blocks of the plan being built hold the host."""
    env = p_step_with_the_host_tier_busy()
    assert env.kv._holds == {"send:r1": [0, 1, 2]} and env.side.has_sends and env.control.take() == []
    sends: list[PoolSend] = []
    for _ in range(2):  # see test_p_held_blocks_are_staged_in_the_next_step_and_not_written_through
        assert env.control.take() == []
        sends, failed = p_step(env)
        assert failed == []
        if sends:
            break
    [send] = sends
    assert (send.room, send.device_block_ids, send.keys) == ("r1", [0, 1, 2], KEYS)
    assert not env.kv._holds and env.control.take() == [done_ok()]
    assert_p_idle(env)


def test_p_held_blocks_are_staged_in_the_next_step_and_not_written_through() -> None:
    env = p_step_with_the_host_tier_busy()
    assert env.kv.tiers._ops.build() == CacheOps()  # the PoolSend to come writes these blocks
    # (host block 0, freed by the step in flight, went to the back of the free list)
    assert p_step(env) == ([pool_send([0, 1, 2], [1, 2, 0])], [])
    assert env.control.take() == [done_ok()]
    assert_p_idle(env)


def test_p_prompt_larger_than_the_host_tier_fails_the_write_at_once() -> None:
    env = make_p(num_host_blocks=2)
    request = p_add(env)
    env.side.on_control(dest())
    assert p_step(env) == ([], [])
    assert request.is_finished and request.finish_reason is FinishReason.LENGTH
    [(_, done)] = env.control.take()
    assert isinstance(done, KVDone) and done.status == "error" and done.code == WRITE_FAILED
    assert_p_idle(env)


def test_p_kvabort_while_held_releases_the_blocks() -> None:
    env = make_p(num_host_blocks=3)
    p_add(env, "a")
    p_add(env, "b", prompt=range(300, 310))
    env.side.on_control(dest("b", prompt=range(300, 310)))
    p_step(env)  # a staged (no KVDest yet), b held
    assert env.kv._holds == {"send:b": [3, 4, 5]}
    failed = env.side.on_control(KVAbort(room="b", reason="aborted on decode"))
    assert [req_id for req_id, _ in failed] == ["b"]
    assert env.control.take() == [
        (D_ADDR, KVDone(room="b", status="error", code="aborted", error="aborted by the decode instance"))
    ]
    p_fail(env, failed)
    assert not env.kv._holds and not env.side.has_sends
    env.side.on_control(dest("a"))
    assert env.control.take() == [done_ok("a")]
    assert_p_idle(env)


@pytest.mark.parametrize("when", ["before_prefill", "after_write"])
@pytest.mark.parametrize(
    "bad, expected",
    [
        (
            dest(tp_size=2),
            "the prefill instance has tensor-parallel size 1 and the decode instance 2; P and D must "
            "have the same tensor-parallel size for now",
        ),
        (
            dest(fingerprint="0" * 64),
            f"KV layout mismatch: this prefill instance's fingerprint is {FP[:16]}..., the "
            f"decode instance's {'0' * 16}...; both must serve the same model weights, "
            "dtype and block size",
        ),
        (
            dest(prompt=range(100, 111)),
            "the decode instance has a 11-token prompt, this prefill instance 10 tokens: "
            "P and D tokenized the request differently",
        ),
    ],
)
def test_p_refuses_a_bad_dest(when: str, bad: KVDest, expected: str) -> None:
    env = make_p()
    request = p_add(env)
    if when == "after_write":
        assert p_step(env) == ([pool_send([0, 1, 2], [0, 1, 2])], [])
        assert request.is_finished
    refuse_dest(env, bad, expected)
    if when == "before_prefill":
        assert request.is_finished and request.finish_reason is FinishReason.ABORT
    assert p_step(env) == ([], [])  # nothing is staged for it afterwards
    assert_p_idle(env)


def test_p_expire_without_kvdest_after_the_write() -> None:
    env = make_p(timeout=60.0)
    p_add(env)
    p_step(env)
    env.clock.now += 60.5
    assert env.side.expire() == [
        ("r1", RequestError(502, "kv_transfer_timeout", "no KVDest from the decode instance within 60s"))
    ]
    assert env.control.take() == []
    assert env.side.stats.failures == {"timeout": 1}
    assert_p_idle(env)


def test_p_two_prompts_in_one_step_each_get_their_pool_send() -> None:
    env = make_p(budget=64)
    p_add(env, "a")
    p_add(env, "b", prompt=range(300, 306))
    env.side.on_control(dest("b", [40, 41], prompt=range(300, 306)))
    sends, failed = p_step(env, failed={0: {"a": "boom"}})
    assert sends == [
        pool_send([0, 1, 2], [0, 1, 2], room="a"),
        pool_send([3, 4], [3, 4], expected_keys(range(300, 306)), room="b"),
    ]
    assert failed == []
    assert env.control.take() == [done_ok("b")]  # a waits for its KVDest, then learns its write failed
    env.side.on_control(dest("a"))
    [(_, done)] = env.control.take()
    assert isinstance(done, KVDone) and done.code == WRITE_FAILED and done.error.endswith("rank 0: boom")
    assert env.side.stats.bytes_sent == 2 * BYTES_PER_OBJECT
    assert_p_idle(env)


def test_p_prefix_hit_stages_the_shared_blocks_too() -> None:
    env = make_p()
    warm = Request("warm", PROMPT, SamplingParams(max_tokens=1, temperature=0))
    env.scheduler.add_request(warm)  # a plain request with the same prompt fills the prefix cache
    assert p_step(env) == ([], [])
    p_drain(env)
    request = p_add(env)
    env.side.on_control(dest())
    sends, failed = p_step(env)
    assert failed == [] and len(sends) == 1
    [send] = sends
    assert env.plans[-1].plan.seqs[0].start_pos == 8  # blocks 0 and 1 are device hits
    assert send.device_block_ids == env.plans[-1].plan.seqs[0].block_ids and len(send.device_block_ids) == 3
    assert send.keys == KEYS
    assert request.is_finished and env.control.take() == [done_ok(num_cached_tokens=8)]
    assert_p_idle(env)


def test_p_abort_before_the_last_chunk_tells_d_and_stages_nothing() -> None:
    env = make_p(budget=4)
    p_add(env)
    env.side.on_control(dest())
    assert p_step(env) == ([], [])
    assert env.side.abort("r1") is False  # scheduled: the scheduler finishes it
    env.scheduler.abort("r1")
    env.check()
    assert env.control.take() == [
        (
            D_ADDR,
            KVDone(
                room="r1", status="error", code="kv_transfer_failed", error="the prefill instance aborted the request"
            ),
        )
    ]
    assert p_step(env) == ([], [])
    assert_p_idle(env)


def test_p_abort_after_the_first_token_lets_the_write_go_on() -> None:
    env = make_p(num_host_blocks=3)
    p_add(env, "a")
    p_add(env, "b", prompt=range(300, 310))
    p_step(env)  # a staged, b held: both have their first token
    assert env.side.abort("b") is False
    env.scheduler.abort("b")  # already finished here: nothing happens
    assert env.control.take() == [] and env.kv._holds == {"send:b": [3, 4, 5]}
    env.side.on_control(dest("a"))
    env.side.on_control(dest("b", prompt=range(300, 310)))
    assert env.control.take() == [done_ok("a")]
    p_drain(env)
    assert env.control.take() == [done_ok("b")]
    assert_p_idle(env)


def test_p_write_failure_message_from_a_real_rank_names_the_rank_once() -> None:
    torch = pytest.importorskip("torch")
    from pdserve.worker.kv_tiers import KVTiers

    # [layers, 2, blocks, block size, heads, head dim] float32: 64 bytes per block; the pool holds two
    tiers = KVTiers(torch.zeros(1, 2, 16, BS, 1, 2), 16, 1, "memory", {"capacity": 128})
    report = tiers.send([pool_send([0, 1, 2], [0, 1, 2])])
    assert report.rank == 1 and report.num_bytes == 128 and list(report.failed) == ["r1"]
    env = make_p(tp_size=2)
    p_add(env)
    env.side.on_control(dest(tp_size=2))
    sched = env.scheduler.schedule()
    sched.plan.pool_sends = env.side.plan_pool_sends(sched)
    assert sched.plan.pool_sends == [pool_send([0, 1, 2], [0, 1, 2])]
    output = ForwardOutput(
        step_id=sched.plan.step_id, req_ids=["r1"], token_ids=[7], kv_sent=[KVSendReport(rank=0, num_bytes=192), report]
    )
    assert env.side.on_output(sched.plan, output) == []
    env.scheduler.update(sched, output)
    [(_, done)] = env.control.take()
    assert isinstance(done, KVDone) and done.code == WRITE_FAILED
    assert "rank 1: rank 1" not in done.error
    assert done.error == (
        "the prefill instance could not write the prompt's 3 blocks to the KV pool: rank 1: 1 of 3 "
        "prompt blocks could not be written to the pool"
    )


# ---- D ---------------------------------------------------------------------------------


class FakePool:
    """read_pool: records each batch of loads; reads all keys of a load unless `counts` says how many."""

    def __init__(self) -> None:
        self.calls: list[list[PoolLoad]] = []
        self.counts: dict[str, int] = {}
        self.clock: Clock | None = None  # advanced by `seconds` per call, if set
        self.seconds = 0.0

    def __call__(self, loads: list[PoolLoad]) -> list[int]:
        self.calls.append(list(loads))
        if self.clock is not None:
            self.clock.now += self.seconds
        return [self.counts.get(load.req_id, len(load.keys)) for load in loads]


@dataclass
class DEnv(control.DEnv):
    pool: FakePool


def make_d(num_blocks: int = 16, num_host_blocks: int = 16, policy: str = "fail", tp_size: int = 1) -> DEnv:
    # storage-mode D caches prompt + output at finish (EngineCore)
    kv = KVCacheManager(num_blocks, BS, num_host_blocks=num_host_blocks, has_pool=True, cache_output=True)
    scheduler = Scheduler(SchedulerConfig(8, 2048), kv, max_model_len=1024)
    control = FakeChannel(D_ADDR)
    clock = Clock()
    disagg = DisaggConfig(
        role="decode",
        kv_transfer="storage",
        transfer_timeout=60.0,
        admission_timeout=30.0,
        kv_load_failure_policy=policy,
    )
    pool = FakePool()
    side = StorageDecode(
        kv,
        scheduler,
        control,
        REGIONS,
        FP,
        tp_size,
        BYTES_PER_BLOCK,
        disagg,  # type: ignore[arg-type]
        clock=clock,
        read_pool=pool,
    )
    return DEnv(kv, scheduler, control, clock, side, pool)


def d_add(env: DEnv, req_id: str = "r1", prompt: Sequence[int] = PROMPT, max_tokens: int = 8) -> Request:
    return control.d_add(env, req_id, prompt=prompt, max_tokens=max_tokens, mode="storage")


def d_step(env: DEnv, token: int = 60) -> tuple[SchedulerOutput, list[RequestUpdate]]:
    sched = env.scheduler.schedule()
    env.check()
    sampled = [s.req_id for s in sched.plan.seqs if s.sample]
    output = ForwardOutput(step_id=sched.plan.step_id, req_ids=sampled, token_ids=[token] * len(sampled))
    updates = env.scheduler.update(sched, output)
    env.side.on_step()
    env.check()
    return sched, updates


def d_ready(env: DEnv, req_id: str = "r1", prompt: Sequence[int] = PROMPT, max_tokens: int = 8) -> Request:
    """Added and admitted: KVDest sent to P."""
    request = d_add(env, req_id, prompt, max_tokens)
    assert d_admit(env) == []
    [(to, kvdest)] = env.control.take()
    assert to == P_ADDR and isinstance(kvdest, KVDest) and kvdest.room == req_id
    return request


def kvdone(room: str = "r1", token: int = 50, tp_size: int = 1, fingerprint: str = FP, **kw: object) -> KVDone:
    return KVDone(room=room, first_token=token, tp_size=tp_size, fingerprint=fingerprint, **kw)  # type: ignore[arg-type]


def write_failed(room: str = "r1") -> KVDone:
    return kvdone(
        room,
        token=7,
        status="error",
        code=WRITE_FAILED,
        error="the prefill instance could not write the prompt's 3 blocks to the KV pool: rank 1: store down",
    )


def assert_d_idle(env: DEnv) -> None:
    for _ in range(3):  # the engine core runs steps while cache ops are pending (writes of finished requests)
        if not env.scheduler.has_work:
            break
        d_step(env)
    control.assert_d_idle(env)
    assert not env.side._to_read and not env.scheduler.has_work and not env.scheduler.requests
    assert_no_host_refs(env.kv)


def rotate_host(env: DEnv, n: int) -> None:
    """Move the host free list on by n, so host block ids differ from device block ids."""
    assert env.kv.host is not None
    ids, _ = env.kv.host.allocate(n)
    env.kv.host.free(ids)


def reorder_free(pool: BlockPool, first: list[int]) -> None:
    """Put `first` at the head of an idle pool's free list, in that order (the next allocation takes them)."""
    ids, _ = pool.allocate(pool.num_blocks)
    pool.free([*first, *(b for b in ids if b not in first)])


def test_d_storage_needs_a_pool_reader() -> None:
    kv = KVCacheManager(16, BS, num_host_blocks=4, has_pool=True)
    scheduler = Scheduler(SchedulerConfig(8, 2048), kv, max_model_len=1024)
    with pytest.raises(ValueError, match="storage mode needs a pool reader"):
        StorageDecode(
            kv,
            scheduler,
            FakeChannel(D_ADDR),
            REGIONS,
            FP,
            1,
            1000,  # type: ignore[arg-type]
            DisaggConfig(role="decode", kv_transfer="storage"),
        )


@pytest.mark.parametrize("policy", ["fail", "recompute"])
def test_d_kvdest_carries_the_load_failure_policy(policy: str) -> None:
    env = make_d(policy=policy)
    d_add(env)
    d_admit(env)
    [(_, kvdest)] = env.control.take()
    assert kvdest == KVDest(
        room="r1",
        block_ids=[0, 1, 2],
        regions=REGIONS,
        fingerprint=FP,
        tp_size=1,
        num_prompt_tokens=10,
        prompt_digest=prompt_digest(list(PROMPT)),
        reply_to=D_ADDR,
        load_failure_policy=policy,
    )


def test_d_all_blocks_read_starts_decoding_with_p_token() -> None:
    env = make_d()
    assert env.kv.host is not None
    reorder_free(env.kv.device, [7, 3, 11])  # the request's blocks, in table order
    reorder_free(env.kv.host, [9, 2, 5])  # the host blocks its read takes
    request = d_ready(env)
    assert env.kv.block_ids("r1") == [7, 3, 11]
    assert env.pool.calls == []  # nothing is read before KVDone
    env.clock.now += 0.25
    updates = d_control(env, kvdone(token=50, logprobs=[(50, -0.5)]))
    assert updates == [RequestUpdate(request, [50], [[(50, -0.5)]], finished=False)]
    assert env.pool.calls == [[PoolLoad("r1", KEYS, [9, 2, 5])]]
    assert request.num_computed_tokens == 10 and request.output_token_ids == [50]
    assert env.scheduler.running == [request] and request.status is RequestStatus.RUNNING
    assert env.side.num_pending == 0
    stats = env.side.stats
    assert stats.bytes_received == 3 * BYTES_PER_BLOCK and stats.num_transfers == 1 and stats.seconds_sum == 0.25
    assert not stats.failures and stats.num_load_recomputes == 0 and stats.num_recomputed_tokens == 0
    # the next step copies the blocks read into the request's blocks, in order, then decodes from position 10
    sched, updates = d_step(env, token=61)
    assert sched.plan.cache_ops == CacheOps(swap_in=[(9, 7), (2, 3), (5, 11)])
    assert [(s.start_pos, s.token_ids, s.block_ids) for s in sched.plan.seqs] == [(10, [50], [7, 3, 11])]
    assert updates == [RequestUpdate(request, [61], None, finished=False)]
    # the step ran: the host blocks are released; the full ones stay cached under their keys
    assert_no_host_refs(env.kv)
    full = chain_keys(ROOT, PROMPT, BS)
    assert env.kv.host.lookup(full[0]) == 9 and env.kv.host.lookup(full[1]) == 2
    assert env.kv.host.key_of(5) is None
    # the device blocks are named too: another request can share the prefix
    assert env.kv.device.lookup(full[0]) == 7 and env.kv.device.lookup(full[1]) == 3
    env.scheduler.abort("r1")
    assert_d_idle(env)


def test_d_swap_ins_go_into_the_request_blocks_not_the_first_free_ones() -> None:
    env = make_d()
    other = d_ready(env, "other", prompt=range(500, 506))  # takes device blocks 0, 1 and host 0, 1
    request = d_ready(env)
    assert env.kv.block_ids("r1") == [2, 3, 4]
    d_control(env, kvdone("other"))
    d_control(env, kvdone("r1"))
    assert [load.host_block_ids for call in env.pool.calls for load in call] == [[0, 1], [2, 3, 4]]
    assert env.kv.take_ops().swap_in == [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4)]
    env.kv.end_step()
    env.check()
    assert_no_host_refs(env.kv)
    assert request.num_computed_tokens == 10 and other.num_computed_tokens == 6
    env.scheduler.abort("other")
    env.scheduler.abort("r1")
    assert_d_idle(env)


@pytest.mark.parametrize("first_token, max_tokens, reason", [(2, 8, FinishReason.STOP), (50, 1, FinishReason.LENGTH)])
def test_d_read_and_finish_at_once(first_token: int, max_tokens: int, reason: FinishReason) -> None:
    env = make_d()
    request = d_ready(env, max_tokens=max_tokens)
    assert d_control(env, kvdone(token=first_token)) == [RequestUpdate(request, [first_token], None, finished=True)]
    assert request.finish_reason is reason
    assert_d_idle(env)


def test_d_missing_blocks_with_fail_is_502_kv_load_failed() -> None:
    env = make_d()
    request = d_ready(env)
    env.pool.counts["r1"] = 1
    updates = d_control(env, kvdone())
    assert updates == [
        RequestUpdate(
            request,
            [],
            finished=True,
            error=RequestError(
                502,
                "kv_load_failed",
                "2 of the prompt's 3 KV blocks were missing from the KV pool or could not be read "
                "(evicted, or the pool failed: see pdserve_kv_store_errors_total); retry the request, or run the decode "
                "instance with --kv-load-failure-policy recompute to prefill missing blocks there",
            ),
        )
    ]
    assert len(env.pool.calls) == 1
    assert request.status is RequestStatus.FINISHED and request.finish_reason is FinishReason.ABORT
    assert not env.scheduler.requests and request.output_token_ids == []
    assert env.control.take() == []  # P is done with the room: no KVAbort, no quarantine
    assert not env.kv._holds and env.kv.num_free_blocks == 16
    assert env.kv.take_ops() == CacheOps()  # nothing copied
    env.kv.end_step()
    stats = env.side.stats
    assert stats.failures == {"load_failed": 1} and stats.bytes_received == 1 * BYTES_PER_BLOCK
    assert stats.num_load_recomputes == 0 and stats.num_recomputed_tokens == 0
    assert_d_idle(env)


@pytest.mark.parametrize("num_read", [0, 1, 2])
def test_d_missing_blocks_with_recompute_prefills_the_rest(num_read: int) -> None:
    env = make_d(policy="recompute")
    rotate_host(env, 4)
    request = d_ready(env)
    env.pool.counts["r1"] = num_read
    assert d_control(env, kvdone(token=50)) == [RequestUpdate(request, [])]
    assert request.num_computed_tokens == num_read * BS and request.output_token_ids == []
    assert env.scheduler.running == [request] and env.side.num_pending == 0
    stats = env.side.stats
    assert stats.failures == {"load_failed": 1} and stats.num_load_recomputes == 1
    assert stats.num_recomputed_tokens == 10 - num_read * BS and stats.bytes_received == num_read * BYTES_PER_BLOCK
    # the next step copies the blocks read and prefills the rest of the prompt here, sampling the first token
    sched, updates = d_step(env, token=61)
    assert sched.plan.cache_ops.swap_in == [(4 + i, i) for i in range(num_read)]
    [seq] = sched.plan.seqs
    assert (seq.start_pos, seq.token_ids, seq.block_ids, seq.sample) == (
        num_read * BS,
        list(PROMPT[num_read * BS :]),
        [0, 1, 2],
        True,
    )
    assert updates == [RequestUpdate(request, [61], None, finished=False)]
    assert request.num_computed_tokens == 10 and request.output_token_ids == [61]
    assert_no_host_refs(env.kv)
    sched, _ = d_step(env, token=62)
    assert [(s.start_pos, s.token_ids) for s in sched.plan.seqs] == [(10, [61])]
    env.scheduler.abort("r1")
    assert_d_idle(env)


def test_d_write_failed_kvdone_with_fail_does_not_read() -> None:
    env = make_d()
    request = d_ready(env)
    updates = d_control(env, write_failed())
    assert env.pool.calls == []
    [update] = updates
    assert update.request is request and update.finished and update.new_token_ids == []
    assert update.error == RequestError(
        502,
        "kv_load_failed",
        "3 of the prompt's 3 KV blocks were missing from the KV pool or could not be read "
        "(the prefill instance could not write the prompt's 3 blocks to the KV pool: rank 1: store down); retry the "
        "request, or run the decode instance with --kv-load-failure-policy recompute to prefill missing blocks there",
    )
    assert env.control.take() == []
    assert env.side.stats.failures == {"load_failed": 1} and env.side.stats.bytes_received == 0
    assert_d_idle(env)


def test_d_write_failed_kvdone_with_recompute_prefills_everything() -> None:
    env = make_d(policy="recompute")
    request = d_ready(env)
    assert d_control(env, write_failed()) == [RequestUpdate(request, [])]
    assert env.pool.calls == []
    assert request.num_computed_tokens == 0 and request.output_token_ids == []
    assert env.side.stats.num_load_recomputes == 1 and env.side.stats.num_recomputed_tokens == 10
    sched, updates = d_step(env, token=61)
    assert sched.plan.cache_ops == CacheOps()
    assert [(s.start_pos, len(s.token_ids), s.sample) for s in sched.plan.seqs] == [(0, 10, True)]
    assert updates == [RequestUpdate(request, [61], None, finished=False)]
    env.scheduler.abort("r1")
    assert_d_idle(env)


@pytest.mark.parametrize("code", ["kv_transfer_failed", "aborted"])
def test_d_other_kvdone_errors_fail_without_reading_whatever_the_policy(code: str) -> None:
    env = make_d(policy="recompute")
    request = d_ready(env)
    assert d_control(env, KVDone(room="r1", status="error", code=code, error="x")) == [
        RequestUpdate(
            request, [], finished=True, error=RequestError(502, code, "the prefill instance failed the KV transfer: x")
        )
    ]
    assert env.pool.calls == [] and env.side.stats.failures == {"peer_error": 1}
    assert_d_idle(env)


def test_d_tp_size_mismatch_is_named() -> None:
    env = make_d()
    request = d_ready(env)
    env.pool.counts["r1"] = 0  # the writer's objects are named for its ranks and its chain: none found
    [update] = d_control(env, kvdone(tp_size=2))
    assert update.request is request and update.error is not None
    assert update.error.status == 502 and update.error.code == "kv_load_failed"
    assert update.error.message.startswith("3 of the prompt's 3 KV blocks were missing")
    assert "TP size 2" in update.error.message and "TP size 1" in update.error.message
    assert_d_idle(env)


def test_d_fingerprint_mismatch_is_named() -> None:
    env = make_d()
    d_ready(env)
    env.pool.counts["r1"] = 0
    [update] = d_control(env, kvdone(fingerprint="0" * 64))
    assert update.error is not None and update.error.code == "kv_load_failed"
    assert "another model, dtype, block size or layout" in update.error.message
    assert_d_idle(env)


def test_d_no_host_room_defers_the_read_to_a_later_admit() -> None:
    env = make_d(num_host_blocks=4)
    a = d_ready(env, "a")
    b = d_ready(env, "b", prompt=range(300, 310))
    assert d_control(env, kvdone("a", token=50)) == [RequestUpdate(a, [50], None, finished=False)]
    # a's 3 host blocks are held until the step carrying its swap-ins has run: no room for b's 3
    assert d_control(env, kvdone("b", token=51)) == []
    assert [[load.req_id for load in call] for call in env.pool.calls] == [["a"]]
    assert "b" in env.side.receiving and env.side.num_pending == 1
    assert d_admit(env) == []  # still no room: the step has not run
    assert len(env.pool.calls) == 1
    sched, _ = d_step(env)
    assert sched.plan.cache_ops.swap_in == [(0, 0), (1, 1), (2, 2)]
    updates = d_admit(env)
    assert updates == [RequestUpdate(b, [51], None, finished=False)]
    [[load]] = env.pool.calls[1:]
    assert load.req_id == "b" and load.keys == expected_keys(range(300, 310)) and len(load.host_block_ids) == 3
    assert env.side.num_pending == 0 and b.num_computed_tokens == 10
    sched, _ = d_step(env)
    assert sched.plan.cache_ops.swap_in == list(zip(load.host_block_ids, env.kv.block_ids("b")))
    env.scheduler.abort("a")
    env.scheduler.abort("b")
    assert_d_idle(env)


def make_d_with_a_deferred_read() -> tuple[DEnv, Request]:
    """Requests a and b of 3 blocks each ready on a host tier of 4 blocks, then KVDone for both: a's read holds
    3 host blocks until a step runs, so b's read is deferred. Returns (env, b)."""
    env = make_d(num_host_blocks=4)
    d_ready(env, "a")
    b = d_ready(env, "b", prompt=range(300, 310))
    d_control(env, kvdone("a"))
    assert d_control(env, kvdone("b")) == []  # deferred; no step runs to free the host
    return env, b


def test_d_deferred_read_still_has_the_receive_deadline() -> None:
    env, b = make_d_with_a_deferred_read()
    env.clock.now += 60.0
    assert env.side.expire() == [] and d_admit(env) == []
    env.clock.now += 0.5
    updates = env.side.expire()
    env.check()
    assert updates == [
        RequestUpdate(
            b,
            [],
            finished=True,
            error=RequestError(
                502, "kv_transfer_timeout", "the KV cache did not arrive from the prefill instance within 60s"
            ),
        )
    ]
    assert not env.side._to_read and "b" not in env.side.receiving
    assert env.side.stats.failures == {"timeout": 1}
    assert d_admit(env) == [] and len(env.pool.calls) == 1  # never read afterwards
    env.clock.now += 10  # any quarantine is over
    env.side.expire()
    env.scheduler.abort("a")
    assert_d_idle(env)


def test_d_receive_deadline_without_kvdone() -> None:
    env = make_d()
    request = d_ready(env)
    env.clock.now += 60.5
    assert env.side.expire() == [
        RequestUpdate(
            request,
            [],
            finished=True,
            error=RequestError(
                502, "kv_transfer_timeout", "the KV cache did not arrive from the prefill instance within 60s"
            ),
        )
    ]
    env.check()
    assert env.control.take() == [(P_ADDR, KVAbort(room="r1", reason="kv_transfer_timeout"))]
    assert env.pool.calls == []
    env.clock.now += 10
    env.side.expire()
    assert_d_idle(env)


def test_d_abort_while_the_read_is_deferred() -> None:
    env, b = make_d_with_a_deferred_read()
    assert env.side.abort("b") is True
    env.check()
    assert b.is_finished and not env.side._to_read
    d_step(env)
    assert d_admit(env) == [] and len(env.pool.calls) == 1
    env.clock.now += 10
    env.side.expire()
    env.control.take()
    env.scheduler.abort("a")
    assert_d_idle(env)


def test_d_prompt_larger_than_the_host_tier_applies_the_policy_at_once() -> None:
    env = make_d(num_host_blocks=2)
    request = d_ready(env)
    [update] = d_control(env, kvdone())
    assert update.request is request and update.error is not None and update.error.code == "kv_load_failed"
    assert_d_idle(env)


def test_d_prompt_blocks_read_from_the_pool_are_not_written_back() -> None:
    env = make_d()
    request = d_ready(env, max_tokens=1)
    assert d_control(env, kvdone(token=50)) == [RequestUpdate(request, [50], None, finished=True)]
    full = chain_keys(ROOT, PROMPT, BS)
    assert not any(key in (k.hex() for k in full) for _, key in env.kv.tiers._ops.build().pool_put)
    assert_d_idle(env)


def test_d_stats_snapshot() -> None:
    env = make_d(policy="recompute")
    d_ready(env, "a")
    d_ready(env, "b", prompt=range(300, 310))
    d_ready(env, "c", prompt=range(400, 406))
    env.pool.counts["b"] = 1
    env.pool.clock, env.pool.seconds = env.clock, 0.125
    d_control(env, kvdone("a"))
    d_control(env, kvdone("b"))
    d_control(env, write_failed("c"))  # no read: no pool time
    assert env.side.stats.pool_seconds_get == 0.25
    snapshot = env.side.stats.snapshot()
    assert isinstance(snapshot, TransferCounters)
    assert snapshot.pool_seconds_get == 0.25 and snapshot.bytes_sent == 0
    assert snapshot.bytes_received == (3 + 1) * BYTES_PER_BLOCK
    assert snapshot.failures == {"load_failed": 2}
    assert snapshot.num_load_recomputes == 2 and snapshot.num_recomputed_tokens == (10 - 4) + 6
    assert snapshot.num_transfers == 3
    for req_id in ("a", "b", "c"):
        env.scheduler.abort(req_id)
    assert_d_idle(env)


# ---- P and D together ------------------------------------------------------------------


class DictPool:
    """A pool shared by P and D: P's reports write the objects, D reads the leading ones present."""

    def __init__(self) -> None:
        self.objects: set[str] = set()
        self.calls: list[list[PoolLoad]] = []

    def __call__(self, loads: list[PoolLoad]) -> list[int]:
        self.calls.append(list(loads))
        result = []
        for load in loads:
            n = 0
            for key in load.keys:
                if key not in self.objects:
                    break
                n += 1
            result.append(n)
        return result


@pytest.mark.parametrize("evict, policy", [(None, "fail"), (2, "fail"), (2, "recompute")])
def test_p_and_d_end_to_end_through_a_dict_pool(evict: int | None, policy: str) -> None:
    p, d = make_p(budget=4), make_d(policy=policy)
    pool = DictPool()
    d.side.read_pool = pool
    p_add(p, "req-p", room="room-1")
    request = Request("req-d", PROMPT, SamplingParams(max_tokens=8, temperature=0), eos_token_id=2)
    d.side.add(request, TransferHandle(room="room-1", peer=P_ADDR, mode="storage"))
    assert p_step(p) == ([], [])
    d_admit(d)
    [(_, kvdest)] = d.control.take()
    assert isinstance(kvdest, KVDest)
    assert p.side.on_control(kvdest) == []
    assert p_step(p) == ([], [])
    sends, _ = p_step(p, token=77)
    [send] = sends
    pool.objects.update(send.keys)
    if evict is not None:
        pool.objects.discard(send.keys[evict])
    [(to, done)] = p.control.take()
    assert to == D_ADDR and done == KVDone(room="room-1", first_token=77, tp_size=1, fingerprint=FP)
    assert isinstance(done, KVDone)
    updates = d_control(d, done)
    [[load]] = pool.calls
    assert list(load.keys) == send.keys  # D names the objects exactly as P wrote them
    if evict is None:
        assert updates == [RequestUpdate(request, [77], None, finished=False)]
        assert request.num_computed_tokens == 10
    elif policy == "fail":
        [update] = updates
        assert update.error is not None and "1 of the prompt's 3" in update.error.message
    else:
        assert updates == [RequestUpdate(request, [])] and request.num_computed_tokens == 8
    assert_p_idle(p)
    d.scheduler.abort("req-d")
    assert_d_idle(d)
