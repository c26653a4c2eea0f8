"""The PD control plane without a model: D's admission reserve, P's send plan step by step, D's admission,
KVDest/KVDone handling, deadlines and quarantine, and the control channel. A real Scheduler and
KVCacheManager on each side, a fake clock and a fake ControlChannel; exact block ids and message lists,
free blocks back to total, check_integrity() after every operation."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import zmq

from pdserve.config import DisaggConfig, SchedulerConfig
from pdserve.disagg.control import ControlChannel, layout_mismatch, prompt_digest
from pdserve.disagg.decode import QUARANTINE_SECONDS, DecodeSide
from pdserve.disagg.direct import DirectDecode, DirectPrefill
from pdserve.disagg.prefill import PrefillSide
from pdserve.disagg.reserve import DecodeReserve, Reservee
from pdserve.kvcache import KVCacheManager
from pdserve.messages import (
    ForwardOutput,
    KVAbort,
    KVDest,
    KVDone,
    KVRegion,
    KVSend,
    KVSendReport,
    Message,
    TransferHandle,
)
from pdserve.request import FinishReason, Request, RequestStatus, SamplingParams
from pdserve.scheduler.scheduler import RequestError, RequestUpdate, Scheduler, SchedulerOutput

BS = 4
P_ADDR = "tcp://10.0.0.1:5000"
D_ADDR = "tcp://10.0.0.2:6000"
FP = "f" * 64
REGIONS = [
    [
        KVRegion(
            engine="shm",
            hostname="d-host",
            address="/dev/shm/pdserve-kv-0",
            base=0,
            num_layers=2,
            num_blocks=16,
            chunk_nbytes=256,
        )
    ]
]
PROMPT = tuple(range(100, 110))  # 10 tokens: blocks of 4, 4 and 2
D_BLOCKS = [20, 21, 22]  # where D wants the prompt's blocks


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeChannel:
    """Records what would be sent; never fails."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sent: list[tuple[str, Message]] = []

    def send(self, address: str, message: Message) -> bool:
        self.sent.append((address, message))
        return True

    def take(self) -> list[tuple[str, Message]]:
        sent, self.sent = self.sent, []
        return sent


def dest(
    room: str = "r1",
    block_ids: Sequence[int] = D_BLOCKS,
    prompt: Sequence[int] = PROMPT,
    fingerprint: str = FP,
    tp_size: int = 1,
) -> KVDest:
    return KVDest(
        room=room,
        block_ids=list(block_ids),
        regions=REGIONS,
        fingerprint=fingerprint,
        tp_size=tp_size,
        num_prompt_tokens=len(prompt),
        prompt_digest=prompt_digest(list(prompt)),
        reply_to=D_ADDR,
    )


def send(src: list[int], dst: list[int], layerwise: bool, room: str = "r1") -> KVSend:
    return KVSend(room=room, regions=REGIONS, src_block_ids=src, dst_block_ids=dst, layerwise=layerwise)


# ---- the reserve -----------------------------------------------------------------------


def test_reserve_formula_hand_computed() -> None:
    r = DecodeReserve(BS, init=1.0, minimum=0.1, decay=0.5, clip=16)
    assert r.num_blocks([]) == 0
    # 10 tokens, 6 to come: ceil(16 / 4) = 4 blocks, 3 held -> 1
    assert r.num_blocks([Reservee(10, 6, 3)]) == 1
    # 7 to come: ceil(17 / 4) = 5 blocks, 3 held -> 2
    assert r.num_blocks([Reservee(10, 7, 3)]) == 2
    # clipped at 16: ceil((10 + 16) / 4) = 7, 3 held -> 4 (as with exactly 16 left)
    assert r.num_blocks([Reservee(10, 5000, 3)]) == 4
    assert r.num_blocks([Reservee(10, 16, 3)]) == 4
    # holding more than it will ever need: 0, never negative, and it does not offset the others
    assert r.num_blocks([Reservee(10, 6, 9)]) == 0
    assert r.num_blocks([Reservee(10, 6, 9), Reservee(10, 6, 3), Reservee(0, 1, 0)]) == 0 + 1 + 1
    # ratio 0.5: 6 to come count as 3: ceil(13 / 4) = 4, 3 held -> 1; 16 (clipped) count as 8: ceil(18/4) = 5 -> 2
    r.ratio = 0.5
    assert r.num_blocks([Reservee(10, 6, 3)]) == 1
    assert r.num_blocks([Reservee(10, 5000, 3)]) == 2
    # nothing left to come: only the blocks of tokens not yet held
    assert r.num_blocks([Reservee(10, 0, 2)]) == 1


def test_reserve_ratio_decays_to_the_minimum_and_resets_on_preemption() -> None:
    r = DecodeReserve(BS, init=2.0, minimum=0.1, decay=0.5, clip=1024)
    assert r.ratio == 2.0
    ratios = []
    for _ in range(7):
        r.on_step()
        ratios.append(r.ratio)
    assert ratios == [1.0, 0.5, 0.25, 0.125, 0.1, 0.1, 0.1]
    assert r.num_blocks([Reservee(0, 40, 0)]) == 1  # 40 * 0.1 = 4 tokens: one block
    r.on_preemption()
    assert r.ratio == 2.0
    assert r.num_blocks([Reservee(0, 40, 0)]) == 20  # 80 tokens


# ---- control helpers -------------------------------------------------------------------


def test_prompt_digest_is_stable_and_tells_prompts_apart() -> None:
    d = prompt_digest([1, 2, 3])
    assert d == prompt_digest((1, 2, 3)) == prompt_digest([1, 2, 3])
    assert len(d) == 32 and int(d, 16) >= 0
    assert (
        len(
            {
                d,
                prompt_digest([1, 2, 4]),
                prompt_digest([1, 2]),
                prompt_digest([1, 2, 3, 0]),
                prompt_digest([3, 2, 1]),
                prompt_digest([]),
            }
        )
        == 6
    )


def test_layout_mismatch() -> None:
    assert layout_mismatch(FP, 2, FP, 2, "prefill") is None
    assert layout_mismatch(FP, 1, FP, 2, "prefill") == (
        "the prefill instance has tensor-parallel size 1 and the decode instance 2; "
        "P and D must have the same tensor-parallel size for now"
    )
    assert layout_mismatch(FP, 1, FP, 2, "decode") == (
        "the prefill instance has tensor-parallel size 2 and the decode instance 1; "
        "P and D must have the same tensor-parallel size for now"
    )
    problem = layout_mismatch("a" * 64, 1, "b" * 64, 1, "prefill")
    assert problem == (
        f"KV layout mismatch: this prefill instance's fingerprint is {'a' * 16}..., the decode "
        f"instance's {'b' * 16}...; both must serve the same model weights, dtype and block size"
    )
    problem = layout_mismatch("a" * 64, 1, "b" * 64, 1, "decode")
    assert problem is not None and problem.startswith("KV layout mismatch: this decode instance's")
    assert "the prefill instance's" in problem
    # a tp mismatch is named first
    problem = layout_mismatch("a" * 64, 1, "b" * 64, 4, "prefill")
    assert problem is not None and "same tensor-parallel size" in problem


def _recv_until(channel: ControlChannel, count: int, timeout: float = 2.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got += channel.recv_all()
        if len(got) < count:
            time.sleep(0.002)
    return got


def test_control_channel_round_trip_drops_bad_messages() -> None:
    ctx = zmq.Context()
    p, d = ControlChannel(ctx=ctx), ControlChannel(ctx=ctx)
    raw = ctx.socket(zmq.PUSH)
    raw.setsockopt(zmq.LINGER, 0)
    try:
        assert p.address.startswith("tcp://127.0.0.1:") and p.address != d.address
        assert p.recv_all() == []
        message = dest("room-x")
        assert d.send(p.address, message)
        assert d.send(p.address, KVAbort(room="room-x", reason="gone", version=99))  # another protocol: dropped
        raw.connect(p.address)
        raw.send(b"\x00not msgpack")  # undecodable: dropped
        assert d.send(p.address, KVAbort(room="room-x", reason="gone"))
        assert p.send(d.address, KVDone(room="room-x", first_token=5, logprobs=[(5, -0.25)]))
        got = _recv_until(p, 2)
        assert got == [message, KVAbort(room="room-x", reason="gone")]
        assert isinstance(got[0], KVDest) and got[0].regions == REGIONS
        assert _recv_until(d, 1) == [KVDone(room="room-x", first_token=5, logprobs=[(5, -0.25)])]
        time.sleep(0.01)
        assert p.recv_all() == [] and d.recv_all() == []
    finally:
        raw.close()
        p.close()
        d.close()
        ctx.term()


# ---- P: the send plan ------------------------------------------------------------------


@dataclass
class PEnv:
    kv: KVCacheManager
    scheduler: Scheduler
    control: FakeChannel
    clock: Clock
    side: PrefillSide

    def check(self) -> None:
        self.scheduler.check_integrity()
        self.kv.check_integrity()
        self.side.check_integrity()

    def set_budget(self, num_tokens: int) -> None:
        self.scheduler.config = SchedulerConfig(8, num_tokens)


def make_p(num_blocks: int = 16, budget: int = 2048, timeout: float = 60.0, tp_size: int = 1) -> PEnv:
    kv = KVCacheManager(num_blocks, BS)
    scheduler = Scheduler(SchedulerConfig(8, budget), kv, max_model_len=1024)
    control = FakeChannel(P_ADDR)
    clock = Clock()
    side = DirectPrefill(kv, control, FP, tp_size, timeout, clock=clock)  # type: ignore[arg-type]
    return PEnv(kv, scheduler, control, clock, side)


def p_request(req_id: str = "r1", prompt: Sequence[int] = PROMPT) -> Request:
    # what PDRole.add does on P: compute the prompt, sample one token
    return Request(req_id, tuple(prompt), SamplingParams(max_tokens=1, temperature=0, stop=[]))


def p_add(env: PEnv, req_id: str = "r1", room: str = "r1", prompt: Sequence[int] = PROMPT) -> Request:
    request = p_request(req_id, prompt)
    env.side.add(request, TransferHandle(room=room, peer=D_ADDR))
    env.scheduler.add_request(request)
    env.check()
    return request


def p_fail(env: PEnv, failed: list[tuple[str, RequestError]]) -> None:
    """What the engine core does with the failures PrefillSide reports."""
    for req_id, _ in failed:
        if req_id in env.scheduler.requests:
            env.scheduler.finish(req_id, FinishReason.ABORT)
    env.check()


def p_step(
    env: PEnv, token: int = 7, failed_rooms: dict[str, str] | None = None, budget: int | None = None
) -> tuple[list[KVSend], list[tuple[str, RequestError]]]:
    """One engine step on P (EngineCore._step with a PD role): schedule, plan sends, execute (fake), then
    on_output BEFORE scheduler.update; failures are finished as the core does."""
    if budget is not None:
        env.set_budget(budget)
    sched: SchedulerOutput = env.scheduler.schedule()
    sched.plan.kv_sends = env.side.plan_sends(sched)
    env.check()
    reports = (
        [
            KVSendReport(
                rank=0,
                num_bytes=100 * sum(len(s.src_block_ids) for s in sched.plan.kv_sends),
                failed=dict(failed_rooms or {}),
            )
        ]
        if sched.plan.kv_sends
        else []
    )
    return sched.plan.kv_sends, p_execute(env, sched, token, reports)


def p_execute(
    env: PEnv, sched: SchedulerOutput, token: int, reports: list[KVSendReport]
) -> list[tuple[str, RequestError]]:
    """The rest of a P step once its sends are planned: the (fake) forward samples `token` for each sequence
    that samples and the ranks report `reports`; on_output BEFORE scheduler.update; failures are finished as
    the core does, and returned."""
    sampled = [seq.req_id for seq in sched.plan.seqs if seq.sample]
    output = ForwardOutput(
        step_id=sched.plan.step_id, req_ids=sampled, token_ids=[token] * len(sampled), kv_sent=reports
    )
    failed = env.side.on_output(sched.plan, output)
    env.check()
    env.scheduler.update(sched, output)
    env.check()
    p_fail(env, failed)
    return failed


def assert_p_idle(env: PEnv) -> None:
    env.check()
    assert env.side.num_pending == 0 and not env.side.has_sends
    assert not env.scheduler.has_work
    assert env.kv.num_free_blocks == env.kv.num_blocks
    assert not env.kv._holds


def done_ok(room: str = "r1", token: int = 7, num_cached_tokens: int = 0) -> tuple[str, KVDone]:
    return (
        D_ADDR,
        KVDone(room=room, first_token=token, num_cached_tokens=num_cached_tokens, tp_size=1, fingerprint=FP),
    )


def test_p_dest_before_prefill_one_step_sends_all_blocks_layerwise() -> None:
    env = make_p()
    p_add(env)
    assert env.side.on_control(dest()) == []
    env.check()
    sends, failed = p_step(env)
    assert sends == [send([0, 1, 2], [20, 21, 22], layerwise=True)]
    assert failed == []
    assert env.control.take() == [done_ok()]
    assert env.side.stats.num_transfers == 1 and env.side.stats.bytes_sent == 300
    assert_p_idle(env)


def test_p_chunked_aligned_sends_each_block_in_its_step() -> None:
    env = make_p(budget=4)
    p_add(env)
    env.side.on_control(dest())
    assert p_step(env) == ([send([0], [20], True)], [])
    assert env.control.take() == []
    assert p_step(env) == ([send([1], [21], True)], [])
    assert env.control.take() == []
    assert p_step(env) == ([send([2], [22], True)], [])
    assert env.control.take() == [done_ok()]
    assert_p_idle(env)


def test_p_chunks_not_aligned_send_blocks_when_full_and_the_partial_last_with_the_last_chunk() -> None:
    env = make_p()
    p_add(env)
    env.side.on_control(dest())
    assert p_step(env, budget=3) == ([], [])  # tokens 0..2: block 0 not full yet
    assert p_step(env, budget=5) == ([send([0, 1], [20, 21], True)], [])  # tokens 3..7 fill blocks 0 and 1
    assert env.control.take() == []
    assert p_step(env, budget=2) == ([send([2], [22], True)], [])  # 8..9: the partial last block, last chunk
    assert env.control.take() == [done_ok()]
    assert_p_idle(env)


def test_p_chunks_with_a_partial_block_between_chunks() -> None:
    env = make_p()
    p_add(env)
    env.side.on_control(dest())
    assert p_step(env, budget=5) == ([send([0], [20], True)], [])  # 0..4: block 1 holds one token
    assert p_step(env, budget=2) == ([], [])  # 5..6: block 1 still not full
    assert p_step(env, budget=3) == ([send([1, 2], [21, 22], True)], [])
    assert env.control.take() == [done_ok()]
    assert_p_idle(env)


def test_p_dest_after_the_first_chunk_catches_up_first() -> None:
    env = make_p(budget=4)
    p_add(env)
    assert p_step(env) == ([], [])
    env.side.on_control(dest())
    assert p_step(env) == ([send([0], [20], False), send([1], [21], True)], [])
    assert env.control.take() == []
    assert p_step(env) == ([send([2], [22], True)], [])
    assert env.control.take() == [done_ok()]
    assert_p_idle(env)


def test_p_dest_after_an_unaligned_chunk_catches_up_only_full_blocks() -> None:
    env = make_p()
    p_add(env)
    assert p_step(env, budget=6) == ([], [])  # tokens 0..5: block 0 full, block 1 half
    env.side.on_control(dest())
    # block 0 computed before: catch-up; block 1 completes in this step: layer-wise; block 2 is the last partial
    assert p_step(env, budget=4) == ([send([0], [20], False), send([1, 2], [21, 22], True)], [])
    assert env.control.take() == [done_ok()]
    assert_p_idle(env)


def test_p_dest_after_prefill_holds_blocks_then_catches_up_and_releases() -> None:
    env = make_p()
    request = p_add(env)
    assert p_step(env, token=9) == ([], [])
    # the scheduler finished the request (max_tokens 1) and freed it; the hold keeps its blocks
    assert request.is_finished and "r1" not in env.scheduler.requests
    assert env.kv._holds == {"send:r1": [0, 1, 2]}
    assert [env.kv.device.ref_count(b) for b in (0, 1, 2)] == [1, 1, 1]
    assert env.kv.num_free_blocks == 16 - 3
    assert env.side.num_pending == 1 and not env.side.has_sends
    assert env.control.take() == []
    # a step with nothing to do sends nothing while KVDest is missing
    sched = env.scheduler.schedule()
    assert env.side.plan_sends(sched) == []
    env.side.on_output(sched.plan, ForwardOutput(step_id=sched.plan.step_id, req_ids=[], token_ids=[]))
    env.check()
    assert env.kv.num_free_blocks == 16 - 3 and env.control.take() == []

    assert env.side.on_control(dest()) == []
    assert env.side.has_sends
    sends, failed = p_step(env)
    assert sends == [send([0, 1, 2], [20, 21, 22], layerwise=False)]
    assert failed == []
    assert env.control.take() == [done_ok(token=9)]
    assert_p_idle(env)


def test_p_held_blocks_are_not_reused_by_the_next_request() -> None:
    env = make_p(num_blocks=5)
    p_add(env)
    p_step(env)
    assert env.kv.num_free_blocks == 2
    other = p_add(env, "r2", "r2", prompt=range(200, 208))  # 2 blocks: only 3 and 4 are free
    env.side.on_control(dest("r2", [30, 31], prompt=range(200, 208)))
    assert p_step(env) == ([send([3, 4], [30, 31], True, room="r2")], [])
    assert other.is_finished
    assert env.control.take() == [done_ok("r2")]
    env.side.on_control(dest())
    assert p_step(env) == ([send([0, 1, 2], [20, 21, 22], False)], [])
    assert env.control.take() == [done_ok()]
    assert_p_idle(env)


def test_p_prefix_cache_hit_catches_up_the_cached_blocks() -> None:
    env = make_p()
    warm = p_request("warm")
    env.scheduler.add_request(warm)  # a plain request with the same prompt fills the prefix cache
    assert p_step(env) == ([], [])
    assert warm.is_finished
    request = p_add(env)
    env.side.on_control(dest())
    sched = env.scheduler.schedule()
    assert [(s.start_pos, s.block_ids) for s in sched.plan.seqs] == [(8, [0, 1, 3])]
    assert env.side.plan_sends(sched) == [send([0, 1], [20, 21], False), send([3], [22], True)]
    output = ForwardOutput(
        step_id=sched.plan.step_id, req_ids=["r1"], token_ids=[7], kv_sent=[KVSendReport(rank=0, num_bytes=300)]
    )
    assert env.side.on_output(sched.plan, output) == []
    env.scheduler.update(sched, output)
    assert request.is_finished
    assert env.control.take() == [done_ok(num_cached_tokens=8)]  # D reports them in the client's usage
    assert_p_idle(env)


def test_p_send_failure_in_a_layerwise_step_fails_the_transfer() -> None:
    env = make_p(budget=4)
    request = p_add(env)
    env.side.on_control(dest())
    sends, failed = p_step(env, failed_rooms={"r1": "connection reset"})
    assert sends == [send([0], [20], True)]
    error = RequestError(502, "kv_transfer_failed", "rank 0: connection reset")
    assert failed == [("r1", error)]
    assert env.control.take() == [
        (D_ADDR, KVDone(room="r1", status="error", code="kv_transfer_failed", error="rank 0: connection reset"))
    ]
    assert request.is_finished and request.finish_reason is FinishReason.ABORT
    assert env.side.stats.failures == {"send_error": 1}
    assert_p_idle(env)


def test_p_send_failure_of_a_catch_up_releases_the_hold() -> None:
    env = make_p()
    p_add(env)
    p_step(env)
    assert env.kv.num_free_blocks == 13
    env.side.on_control(dest())
    sends, failed = p_step(env, failed_rooms={"r1": "timeout writing block 21"})
    assert sends == [send([0, 1, 2], [20, 21, 22], False)]
    assert failed == [("r1", RequestError(502, "kv_transfer_failed", "rank 0: timeout writing block 21"))]
    assert env.control.take() == [
        (D_ADDR, KVDone(room="r1", status="error", code="kv_transfer_failed", error="rank 0: timeout writing block 21"))
    ]
    assert_p_idle(env)


def test_p_failure_reported_by_another_rank_only() -> None:
    env = make_p()
    p_add(env)
    env.side.on_control(dest())
    sched = env.scheduler.schedule()
    sched.plan.kv_sends = env.side.plan_sends(sched)
    output = ForwardOutput(
        step_id=sched.plan.step_id,
        req_ids=["r1"],
        token_ids=[7],
        kv_sent=[KVSendReport(rank=0, num_bytes=300), KVSendReport(rank=1, num_bytes=0, failed={"r1": "peer gone"})],
    )
    failed = env.side.on_output(sched.plan, output)
    assert failed == [("r1", RequestError(502, "kv_transfer_failed", "rank 1: peer gone"))]
    env.scheduler.update(sched, output)
    p_fail(env, failed)
    assert env.control.take() == [
        (D_ADDR, KVDone(room="r1", status="error", code="kv_transfer_failed", error="rank 1: peer gone"))
    ]
    assert_p_idle(env)


def refuse_dest(env: PEnv, bad: KVDest, expected: str) -> None:
    """P gets `bad` for room r1 and refuses it: r1 fails with 502 kv_transfer_failed (finished as the core does),
    D is told why, nothing is pending."""
    failed = env.side.on_control(bad)
    assert failed == [("r1", RequestError(502, "kv_transfer_failed", expected))]
    assert env.control.take() == [
        (D_ADDR, KVDone(room="r1", status="error", code="kv_transfer_failed", error=expected))
    ]
    assert env.side.num_pending == 0
    p_fail(env, failed)


@pytest.mark.parametrize(
    "bad, expected",
    [
        (
            dest(fingerprint="0" * 64),
            f"KV layout mismatch: this prefill instance's fingerprint is {FP[:16]}..., the "
            f"decode instance's {'0' * 16}...; both must serve the same model weights, "
            "dtype and block size",
        ),
        (
            dest(tp_size=2),
            "the prefill instance has tensor-parallel size 1 and the decode instance 2; P and D must "
            "have the same tensor-parallel size for now",
        ),
        (
            dest(prompt=range(200, 210)),
            "the decode instance has a 10-token prompt, this prefill instance 10 tokens: "
            "P and D tokenized the request differently",
        ),
        (
            dest(prompt=range(100, 111)),
            "the decode instance has a 11-token prompt, this prefill instance 10 tokens: "
            "P and D tokenized the request differently",
        ),
        (dest(block_ids=[20, 21]), "the decode instance allocated 2 blocks, too few for the prompt"),
    ],
)
def test_p_refuses_a_bad_dest(bad: KVDest, expected: str) -> None:
    env = make_p()
    p_add(env)
    refuse_dest(env, bad, expected)
    assert_p_idle(env)


def test_p_dest_with_more_blocks_than_needed_is_fine() -> None:
    env = make_p()
    p_add(env)
    assert env.side.on_control(dest(block_ids=[20, 21, 22, 23])) == []
    assert p_step(env) == ([send([0, 1, 2], [20, 21, 22], True)], [])
    assert env.control.take() == [done_ok()]
    assert_p_idle(env)


def test_p_abort_from_d_before_prefill_is_acknowledged() -> None:
    env = make_p()
    p_add(env)
    env.side.on_control(dest())
    failed = env.side.on_control(KVAbort(room="r1", reason="kv_transfer_timeout"))
    assert failed == [
        ("r1", RequestError(499, "aborted_by_decode", "the decode instance aborted: kv_transfer_timeout"))
    ]
    assert env.control.take() == [
        (D_ADDR, KVDone(room="r1", status="error", code="aborted", error="aborted by the decode instance"))
    ]
    p_fail(env, failed)
    assert_p_idle(env)


def test_p_abort_from_d_while_holding_releases_the_hold() -> None:
    env = make_p()
    p_add(env)
    p_step(env)
    env.side.on_control(dest())  # the catch-up is due in the next step, but D gives up first
    assert env.kv.num_free_blocks == 13
    failed = env.side.on_control(KVAbort(room="r1", reason="aborted on decode"))
    assert [req_id for req_id, _ in failed] == ["r1"]
    assert env.control.take() == [
        (D_ADDR, KVDone(room="r1", status="error", code="aborted", error="aborted by the decode instance"))
    ]
    assert_p_idle(env)
    assert p_step(env) == ([], [])  # nothing is sent afterwards


def test_p_abort_from_d_without_dest_is_not_acknowledged() -> None:
    env = make_p()
    p_add(env)
    p_step(env)  # held, no KVDest ever came
    failed = env.side.on_control(KVAbort(room="r1"))
    assert [req_id for req_id, _ in failed] == ["r1"]
    assert env.control.take() == []
    assert_p_idle(env)
    assert env.side.on_control(KVAbort(room="unknown")) == []


def test_p_expire_without_dest() -> None:
    env = make_p(timeout=60.0)
    p_add(env)
    p_step(env)  # the prefill is over, the blocks are held
    env.clock.now += 60.0
    assert env.side.expire() == []  # exactly at the deadline: not yet
    env.clock.now += 0.5
    assert env.side.expire() == [
        ("r1", RequestError(502, "kv_transfer_timeout", "no KVDest from the decode instance within 60s"))
    ]
    assert env.control.take() == []  # nobody to tell
    assert env.side.stats.failures == {"timeout": 1}
    assert_p_idle(env)


def test_p_expire_never_fails_a_transfer_that_has_its_dest() -> None:
    env = make_p(budget=4)
    p_add(env)
    env.side.on_control(dest())
    p_step(env)
    env.clock.now += 1000
    assert env.side.expire() == []
    p_step(env)
    p_step(env)
    assert env.control.take() == [done_ok()]
    assert_p_idle(env)


def test_p_early_dest_is_attached_on_add() -> None:
    env = make_p()
    assert env.side.on_control(dest()) == []
    assert env.side.num_pending == 0
    p_add(env)
    assert p_step(env) == ([send([0, 1, 2], [20, 21, 22], True)], [])
    assert env.control.take() == [done_ok()]
    assert_p_idle(env)


def test_p_stale_early_dest_is_forgotten() -> None:
    env = make_p(timeout=60.0)
    env.side.on_control(dest())
    env.clock.now += 60.5
    assert env.side.expire() == []
    p_add(env)
    assert p_step(env) == ([], [])  # no KVDest: held
    assert env.side.num_pending == 1
    env.clock.now += 60.5
    assert [req_id for req_id, _ in env.side.expire()] == ["r1"]
    assert_p_idle(env)


def test_p_early_abort_cancels_an_early_dest() -> None:
    env = make_p()
    env.side.on_control(dest())
    assert env.side.on_control(KVAbort(room="r1")) == []
    p_add(env)
    assert p_step(env) == ([], [])
    assert env.side.num_pending == 1  # waits for a KVDest that is no longer coming (expire() ends it)


def test_p_early_bad_dest_fails_the_request() -> None:
    """BUG: PrefillSide.add() drops what _attach returns, so a mismatched early KVDest tells D but the
    request is never failed on P: it is prefilled for nothing and finishes as if all went well."""
    env = make_p()
    env.side.on_control(dest(tp_size=2))
    request = p_request()
    failed = env.side.add(request, TransferHandle(room="r1", peer=D_ADDR)) or []  # type: ignore[func-returns-value]
    env.scheduler.add_request(request)
    failed += env.side.expire()  # either add() or the next expire() must report it
    expected = (
        "the prefill instance has tensor-parallel size 1 and the decode instance 2; P and D must have the "
        "same tensor-parallel size for now"
    )
    assert env.control.take() == [
        (D_ADDR, KVDone(room="r1", status="error", code="kv_transfer_failed", error=expected))
    ]
    assert failed == [("r1", RequestError(502, "kv_transfer_failed", expected))]
    p_fail(env, failed)
    assert_p_idle(env)


def test_p_abort_before_the_first_token_tells_d() -> None:
    env = make_p(budget=4)
    p_add(env)
    env.side.on_control(dest())
    assert p_step(env) == ([send([0], [20], True)], [])
    env.side.abort("r1")
    env.scheduler.abort("r1")  # what the engine core does next
    env.check()
    assert env.control.take() == [
        (
            D_ADDR,
            KVDone(
                room="r1", status="error", code="kv_transfer_failed", error="the prefill instance aborted the request"
            ),
        )
    ]
    assert_p_idle(env)
    assert p_step(env) == ([], [])


def test_p_abort_before_dest_tells_nobody() -> None:
    env = make_p(budget=4)
    p_add(env)
    p_step(env)
    env.side.abort("r1")
    env.scheduler.abort("r1")
    assert env.control.take() == []
    assert_p_idle(env)
    env.side.abort("unknown")  # ignored


def test_p_abort_after_the_first_token_lets_the_transfer_go_on() -> None:
    env = make_p()
    p_add(env)
    p_step(env, token=11)
    env.side.abort("r1")
    env.scheduler.abort("r1")  # the request is already finished here: nothing happens
    assert env.control.take() == []
    assert env.side.num_pending == 1 and env.kv.num_free_blocks == 13
    env.side.on_control(dest())
    assert p_step(env) == ([send([0, 1, 2], [20, 21, 22], False)], [])
    assert env.control.take() == [done_ok(token=11)]
    assert_p_idle(env)


def test_p_room_in_use_is_refused() -> None:
    env = make_p()
    p_add(env)
    with pytest.raises(ValueError, match="transfer room 'r1' is already in use"):
        env.side.add(p_request("r2"), TransferHandle(room="r1", peer=D_ADDR))
    env.check()


def test_p_duplicate_request_id_is_refused_before_anything_changes() -> None:
    """BUG: PrefillSide.add() does not check the request id (DecodeSide.add does). PDRole.add calls it before
    scheduler.add_request, which then raises; by then the duplicate has replaced the first transfer in
    _by_req, so the first transfer is never sent and its room never leaves _by_room (it has a KVDest, so
    expire() never ends it)."""
    env = make_p()
    p_add(env)
    env.side.on_control(dest())
    with pytest.raises(ValueError, match="'r1'"):
        env.side.add(p_request("r1"), TransferHandle(room="r2", peer=D_ADDR))
    assert p_step(env) == ([send([0, 1, 2], [20, 21, 22], True)], [])
    assert env.control.take() == [done_ok()]
    assert_p_idle(env)


def test_p_two_requests_in_one_step_keep_plan_order() -> None:
    env = make_p(budget=8)
    p_add(env, "a", "a")
    p_add(env, "b", "b", prompt=range(300, 306))  # 6 tokens: 2 blocks
    env.side.on_control(dest("b", [40, 41], prompt=range(300, 306)))
    # step 1: a gets tokens 0..7 (no dest yet), b waits for budget
    assert p_step(env) == ([], [])
    env.side.on_control(dest("a", [50, 51, 52]))
    # step 2: a's last 2 tokens (catch-up of blocks 0, 1 then block 2), then b's 6 tokens
    sends, failed = p_step(env)
    assert sends == [
        send([0, 1], [50, 51], False, room="a"),
        send([2], [52], True, room="a"),
        send([3, 4], [40, 41], True, room="b"),
    ]
    assert failed == []
    assert env.control.take() == [done_ok("a"), done_ok("b")]
    assert_p_idle(env)


# ---- D: admission, KVDest, KVDone --------------------------------------------------------


@dataclass
class DEnv:
    kv: KVCacheManager
    scheduler: Scheduler
    control: FakeChannel
    clock: Clock
    side: DecodeSide

    def check(self) -> None:
        self.scheduler.check_integrity()
        self.kv.check_integrity()


def make_d(num_blocks: int = 16, max_num_seqs: int = 8, **config: object) -> DEnv:
    kv = KVCacheManager(num_blocks, BS)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs, 2048), kv, max_model_len=1024)
    control = FakeChannel(D_ADDR)
    clock = Clock()
    disagg = DisaggConfig(role="decode", transfer_timeout=60.0, admission_timeout=30.0, **config)  # type: ignore[arg-type]
    side = DirectDecode(kv, scheduler, control, REGIONS, FP, 1, 1000, disagg, clock=clock)  # type: ignore[arg-type]
    return DEnv(kv, scheduler, control, clock, side)


def d_add(
    env: DEnv,
    req_id: str = "r1",
    room: str | None = None,
    prompt: Sequence[int] = PROMPT,
    max_tokens: int = 8,
    incarnation: str = "",
    mode: str = "direct",
) -> Request:
    request = Request(req_id, tuple(prompt), SamplingParams(max_tokens=max_tokens, temperature=0), eos_token_id=2)
    env.side.add(request, TransferHandle(room=room or req_id, peer=P_ADDR, peer_incarnation=incarnation, mode=mode))
    env.check()
    return request


def d_admit(env: DEnv) -> list[RequestUpdate]:
    updates = env.side.admit()
    env.check()
    return updates


def d_control(env: DEnv, message: KVDone | KVAbort) -> list[RequestUpdate]:
    updates = env.side.on_control(message)
    env.check()
    return updates


def d_dest(room: str, block_ids: list[int], prompt: Sequence[int] = PROMPT) -> tuple[str, KVDest]:
    return (
        P_ADDR,
        KVDest(
            room=room,
            block_ids=block_ids,
            regions=REGIONS,
            fingerprint=FP,
            tp_size=1,
            num_prompt_tokens=len(prompt),
            prompt_digest=prompt_digest(list(prompt)),
            reply_to=D_ADDR,
        ),
    )


def assert_d_idle(env: DEnv) -> None:
    env.check()
    assert env.side.num_pending == 0 and not env.side.waiting and not env.side.receiving
    assert env.kv.num_free_blocks == env.kv.num_blocks
    assert not env.kv._holds


def test_d_admits_and_sends_kvdest() -> None:
    env = make_d()
    request = d_add(env)
    assert env.control.sent == []  # nothing before admission
    assert env.side.num_pending == 1
    assert d_admit(env) == []
    assert env.control.take() == [d_dest("r1", [0, 1, 2])]
    assert env.kv.block_ids("r1") == [0, 1, 2]
    assert list(env.side.receiving) == ["r1"] and not env.side.waiting
    assert request.status is RequestStatus.WAITING and "r1" not in env.scheduler.requests
    assert d_admit(env) == [] and env.control.take() == []  # once


def test_d_kvdone_starts_decoding() -> None:
    env = make_d()
    request = d_add(env)
    d_admit(env)
    env.clock.now += 0.25
    updates = d_control(env, KVDone(room="r1", first_token=50, logprobs=[(50, -0.5), (51, -1.5)]))
    assert updates == [RequestUpdate(request, [50], [[(50, -0.5), (51, -1.5)]], finished=False)]
    assert env.scheduler.running == [request] and env.scheduler.requests == {"r1": request}
    assert request.status is RequestStatus.RUNNING
    assert request.num_computed_tokens == 10 and request.output_token_ids == [50]
    assert env.kv.block_ids("r1") == [0, 1, 2]
    assert env.side.num_pending == 0 and not env.side.receiving
    assert env.side.stats.bytes_received == 3 * 1000 and env.side.stats.num_transfers == 1
    assert env.side.stats.seconds_sum == 0.25
    # the next step decodes from position 10 in the received blocks
    sched = env.scheduler.schedule()
    assert [(s.start_pos, s.token_ids, s.block_ids) for s in sched.plan.seqs] == [(10, [50], [0, 1, 2])]
    env.scheduler.abort("r1")
    assert_d_idle(env)


@pytest.mark.parametrize("first_token, max_tokens, reason", [(2, 8, FinishReason.STOP), (50, 1, FinishReason.LENGTH)])
def test_d_kvdone_can_finish_at_once(first_token: int, max_tokens: int, reason: FinishReason) -> None:
    env = make_d()
    request = d_add(env, max_tokens=max_tokens)
    d_admit(env)
    assert d_control(env, KVDone(room="r1", first_token=first_token)) == [
        RequestUpdate(request, [first_token], None, finished=True)
    ]
    assert request.finish_reason is reason and request.output_token_ids == [first_token]
    assert not env.scheduler.running and not env.scheduler.requests
    assert_d_idle(env)


def test_d_kvdone_from_a_stale_incarnation_is_dropped() -> None:
    env = make_d()
    request = d_add(env, incarnation="p-new")
    d_admit(env)
    env.control.take()
    assert d_control(env, KVDone(room="r1", first_token=50, incarnation="p-old")) == []
    assert d_control(env, KVAbort(room="r1", incarnation="p-old")) == []
    assert list(env.side.receiving) == ["r1"] and not env.scheduler.requests
    assert d_control(env, KVDone(room="r1", first_token=50, incarnation="p-new")) == [
        RequestUpdate(request, [50], None, finished=False)
    ]
    assert env.scheduler.running == [request]
    assert d_control(env, KVDone(room="unknown", first_token=1)) == []


def test_d_kvdone_error_fails_with_502_and_frees_at_once() -> None:
    env = make_d()
    request = d_add(env)
    d_admit(env)
    env.control.take()
    updates = d_control(env, KVDone(room="r1", status="error", code="kv_transfer_failed", error="rank 0: boom"))
    assert updates == [
        RequestUpdate(
            request,
            [],
            finished=True,
            error=RequestError(502, "kv_transfer_failed", "the prefill instance failed the KV transfer: rank 0: boom"),
        )
    ]
    assert request.status is RequestStatus.FINISHED and request.finish_reason is FinishReason.ABORT
    assert env.control.take() == []  # P is done with the room: no KVAbort, no quarantine
    assert env.side.stats.failures == {"peer_error": 1}
    assert_d_idle(env)


def test_d_kvdone_error_without_code() -> None:
    env = make_d()
    request = d_add(env)
    d_admit(env)
    assert d_control(env, KVDone(room="r1", status="error", error="x")) == [
        RequestUpdate(
            request,
            [],
            finished=True,
            error=RequestError(502, "kv_transfer_failed", "the prefill instance failed the KV transfer: x"),
        )
    ]
    assert_d_idle(env)


def test_d_kvabort_from_p_fails_without_quarantine() -> None:
    env = make_d()
    request = d_add(env)
    d_admit(env)
    env.control.take()
    assert d_control(env, KVAbort(room="r1", reason="shutting down")) == [
        RequestUpdate(
            request,
            [],
            finished=True,
            error=RequestError(502, "kv_transfer_failed", "the prefill instance aborted: shutting down"),
        )
    ]
    assert env.control.take() == []
    assert_d_idle(env)


def test_d_receive_deadline_quarantines_until_p_acknowledges() -> None:
    env = make_d()
    request = d_add(env)
    env.clock.now += 5
    d_admit(env)  # the receive deadline runs from here: 1005 + 60
    env.control.take()
    env.clock.now = 1065.0
    assert env.side.expire() == []
    env.clock.now = 1065.5
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
    assert env.side.stats.failures == {"timeout": 1}
    # P may still write blocks 0..2: they stay out of reach
    assert env.kv._holds == {"quarantine:r1": [0, 1, 2]}
    assert env.kv.num_free_blocks == 13 and env.side.num_pending == 1
    assert env.kv.block_ids("r1") == []
    other = d_add(env, "r2", prompt=range(200, 204))
    d_admit(env)
    assert env.control.take() == [d_dest("r2", [3], prompt=range(200, 204))]
    # P's acknowledgement (any message for the room) ends the quarantine
    assert (
        d_control(env, KVDone(room="r1", status="error", code="aborted", error="aborted by the decode instance")) == []
    )
    assert env.kv.num_free_blocks == 15 and "quarantine:r1" not in env.kv._holds
    assert d_control(env, KVDone(room="r1", first_token=7)) == []  # a late one is dropped
    d_control(env, KVDone(room="r2", status="error", error="x"))
    assert other.is_finished
    assert_d_idle(env)


def test_d_quarantine_ends_after_quarantine_seconds_without_ack() -> None:
    env = make_d()
    d_add(env)
    d_admit(env)
    env.clock.now += 60.5
    assert len(env.side.expire()) == 1
    assert env.kv.num_free_blocks == 13
    env.clock.now += QUARANTINE_SECONDS
    assert env.side.expire() == []
    env.check()
    assert env.kv.num_free_blocks == 13  # exactly at the end: still held
    env.clock.now += 0.01
    assert env.side.expire() == []
    assert_d_idle(env)


def test_d_late_kvdone_ok_also_ends_the_quarantine() -> None:
    env = make_d()
    d_add(env)
    d_admit(env)
    env.clock.now += 61
    env.side.expire()
    assert d_control(env, KVDone(room="r1", first_token=7)) == []
    assert not env.scheduler.requests
    assert_d_idle(env)


def test_d_admission_timeout_is_503() -> None:
    env = make_d()
    request = d_add(env, prompt=range(1000, 1100))  # 25 blocks: never fits in 16
    assert d_admit(env) == []
    env.clock.now += 30
    assert d_admit(env) == []  # exactly at the deadline: still waiting
    env.clock.now += 0.5
    assert d_admit(env) == [
        RequestUpdate(
            request,
            [],
            finished=True,
            error=RequestError(
                503,
                "no_capacity",
                "the decode instance had no room for 100 prompt tokens within 30s; retry later or add decode capacity",
            ),
        )
    ]
    assert request.status is RequestStatus.FINISHED and request.finish_reason is FinishReason.ABORT
    sent = env.control.take()  # P never got a KVDest, and is told to drop the room
    assert [(address, type(m).__name__, m.room, m.reason) for address, m in sent] == [
        ("tcp://10.0.0.1:5000", "KVAbort", "r1", "no capacity on decode")
    ]
    assert env.side.stats.failures == {"no_capacity": 1}
    assert_d_idle(env)


def _running(env: DEnv, req_id: str, prompt: Sequence[int], max_tokens: int, token: int = 50) -> Request:
    request = d_add(env, req_id, prompt=prompt, max_tokens=max_tokens)
    assert d_admit(env) == []
    env.control.take()
    d_control(env, KVDone(room=req_id, first_token=token))
    return request


def test_d_admission_keeps_the_reserve_fifo() -> None:
    env = make_d(num_blocks=10)
    r1 = _running(env, "r1", PROMPT, max_tokens=8)
    # r1: 11 tokens, 7 to come: ceil(18 / 4) = 5 blocks, holds 3 -> reserve 2; 7 blocks free
    assert env.side.reserve_blocks() == 2 and env.kv.num_free_blocks == 7
    r2 = d_add(env, "r2", prompt=range(200, 221))  # 21 tokens: 6 blocks + its own ceil(29 / 4) - 6 = 2 + 2 > 7
    r3 = d_add(env, "r3", prompt=range(300, 304))  # 1 block + its own 2 + r1's 2 would fit, but r2 is first
    assert env.side.reserve_blocks(r2) == 4 and env.side.reserve_blocks(r3) == 4
    assert d_admit(env) == []
    assert env.control.take() == []
    assert [i.request.req_id for i in env.side.waiting] == ["r2", "r3"]
    env.scheduler.finish("r1", FinishReason.STOP)
    env.check()
    assert env.side.reserve_blocks() == 0 and env.kv.num_free_blocks == 10
    assert d_admit(env) == []
    # r2 takes 6 blocks (6 + 2 <= 10); r3 then needs 1 + its own 2 + receiving r2's 2 = 5 > 4 free: it waits
    assert env.control.take() == [d_dest("r2", [3, 4, 5, 6, 7, 8], prompt=range(200, 221))]
    assert r1.is_finished and [i.request.req_id for i in env.side.waiting] == ["r3"]
    assert env.side.reserve_blocks() == 2
    d_control(env, KVDone(room="r2", status="error", error="x"))  # P gave up: no quarantine, blocks free
    assert env.kv.num_free_blocks == 10
    assert d_admit(env) == []
    [(_, dest)] = env.control.take()
    assert isinstance(dest, KVDest) and dest.room == "r3" and len(dest.block_ids) == 1
    d_control(env, KVDone(room="r3", status="error", error="x"))
    assert_d_idle(env)


def test_d_admission_boundary_is_exact() -> None:
    env = make_d(num_blocks=10)
    _running(env, "r1", PROMPT, max_tokens=8)
    # 12 tokens: 3 blocks + its own ceil((12 + 8) / 4) - 3 = 2 + r1's 2 == 7 free: admitted, exactly
    d_add(env, "r2", prompt=range(200, 212))
    d_admit(env)
    assert env.control.take() == [d_dest("r2", [3, 4, 5], prompt=range(200, 212))]
    assert env.kv.num_free_blocks == 4
    assert env.side.reserve_blocks() == 4  # r1 2, receiving r2 2
    r3 = d_add(env, "r3", prompt=range(300, 304))
    assert env.side.reserve_blocks(r3) == 6  # + r3's own ceil((4 + 8) / 4) - 1
    assert d_admit(env) == [] and env.control.take() == []  # 1 + 6 > 4
    # ratio 0.75: r1 ceil(16.25 / 4) - 3 = 2, r2 ceil(18 / 4) - 3 = 2, r3 ceil(10 / 4) - 1 = 2: 1 + 6 > 4
    env.side.reserve.ratio = 0.75
    assert env.side.reserve_blocks(r3) == 6
    assert d_admit(env) == [] and env.control.take() == []
    # ratio 0.5: r1 ceil(14.5 / 4) - 3 = 1, r2 ceil(16 / 4) - 3 = 1, r3 ceil(8 / 4) - 1 = 1: 1 + 3 == 4
    env.side.reserve.ratio = 0.5
    assert env.side.reserve_blocks(r3) == 3
    assert d_admit(env) == []
    assert env.control.take() == [d_dest("r3", [6], prompt=range(300, 304))]
    env.scheduler.abort("r1")
    d_control(env, KVDone(room="r2", status="error", error="x"))
    d_control(env, KVDone(room="r3", status="error", error="x"))
    assert_d_idle(env)


def test_d_max_num_seqs_counts_running_and_receiving() -> None:
    env = make_d(max_num_seqs=2)
    for i, req_id in enumerate(("r1", "r2", "r3")):
        d_add(env, req_id, prompt=range(100 * i, 100 * i + 4))
    d_admit(env)
    assert [m.room for _, m in env.control.take()] == ["r1", "r2"]  # type: ignore[attr-defined]
    d_control(env, KVDone(room="r1", first_token=50))
    assert len(env.scheduler.running) == 1 and list(env.side.receiving) == ["r2"]
    assert d_admit(env) == [] and env.control.take() == []
    d_control(env, KVDone(room="r2", status="error", error="x"))
    d_admit(env)
    assert [m.room for _, m in env.control.take()] == ["r3"]  # type: ignore[attr-defined]
    env.scheduler.abort("r1")
    d_control(env, KVDone(room="r3", status="error", error="x"))
    assert_d_idle(env)


def test_d_reserve_ratio_decays_per_step_and_resets_after_a_preemption() -> None:
    env = make_d(reserve_ratio_init=2.0, reserve_ratio_min=0.25, reserve_ratio_decay=0.5)
    assert env.side.reserve.ratio == 2.0
    for expected in (1.0, 0.5, 0.25, 0.25):
        env.side.on_step()
        assert env.side.reserve.ratio == expected
    d_admit(env)
    assert env.side.reserve.ratio == 0.25  # no preemption: unchanged
    env.side.on_preemption()  # what the scheduler calls when it preempts a request
    d_admit(env)
    assert env.side.reserve.ratio == 2.0
    env.side.on_step()
    d_admit(env)
    assert env.side.reserve.ratio == 1.0  # the same preemption count resets once


def test_d_reserve_resets_after_a_real_preemption() -> None:
    env = make_d(num_blocks=6, reserve_ratio_min=0.1, reserve_ratio_decay=0.1)
    env.side.on_step()
    assert env.side.reserve.ratio == 0.1
    a = _running(env, "a", range(100, 108), max_tokens=16)  # 8 prompt tokens: blocks 0, 1
    b = _running(env, "b", range(200, 208), max_tokens=16)  # 2 blocks + a's reserve of 1 fit in 4 free
    assert env.kv.block_ids("a") == [0, 1] and env.kv.block_ids("b") == [2, 3]
    # each step appends a token to both; at the 9th and 13th token each grows a block; 6 blocks run out
    for _ in range(8):
        sched = env.scheduler.schedule()
        output = ForwardOutput(
            step_id=sched.plan.step_id,
            req_ids=[s.req_id for s in sched.plan.seqs if s.sample],
            token_ids=[60] * sum(1 for s in sched.plan.seqs if s.sample),
        )
        env.scheduler.update(sched, output)
        env.check()
        if env.scheduler.stats.num_preemptions:
            break
    assert env.scheduler.stats.num_preemptions == 1 and b.num_preemptions == 1 and a.num_preemptions == 0
    d_admit(env)
    assert env.side.reserve.ratio == 1.0
    env.scheduler.abort("a")
    env.scheduler.abort("b")
    assert_d_idle(env)


def test_d_abort_while_waiting() -> None:
    env = make_d()
    request = d_add(env, prompt=range(1000, 1100))  # does not fit
    d_admit(env)
    assert env.side.abort("r1") is True
    assert request.status is RequestStatus.FINISHED and request.finish_reason is FinishReason.ABORT
    assert env.control.take() == []
    assert env.side.abort("r1") is False
    assert_d_idle(env)


def test_d_abort_while_receiving_tells_p_and_quarantines() -> None:
    env = make_d()
    request = d_add(env)
    d_admit(env)
    env.control.take()
    assert env.side.abort("r1") is True
    env.check()
    assert request.is_finished
    assert env.control.take() == [(P_ADDR, KVAbort(room="r1", reason="aborted on decode"))]
    assert env.kv.num_free_blocks == 13 and env.side.num_pending == 1
    assert d_control(env, KVDone(room="r1", status="error", code="aborted")) == []
    assert_d_idle(env)


def test_d_abort_of_a_running_request_is_not_its_business() -> None:
    env = make_d()
    _running(env, "r1", PROMPT, max_tokens=8)
    assert env.side.abort("r1") is False
    assert env.scheduler.requests.keys() == {"r1"}
    env.scheduler.abort("r1")
    assert_d_idle(env)


def test_d_refuses_reused_rooms_and_ids() -> None:
    env = make_d()
    d_add(env, "r1", room="room")
    with pytest.raises(ValueError, match="transfer room 'room' is already in use"):
        d_add(env, "r2", room="room")
    with pytest.raises(ValueError, match="request id 'r1' is already in use"):
        d_add(env, "r1", room="other")
    d_admit(env)
    with pytest.raises(ValueError, match="transfer room 'room' is already in use"):
        d_add(env, "r2", room="room")
    env.side.abort("r1")
    d_control(env, KVAbort(room="room"))  # P's acknowledgement ends the quarantine
    assert_d_idle(env)


def test_d_blocks_handed_to_p_have_no_pending_local_reads() -> None:
    """With a host tier, admission may evict cached device blocks, and allocate_slots records a swap_out
    (device -> host) for each; those ops run only with D's next step plan. KVDest naming those blocks must
    wait until that plan has run, or P could overwrite a block before D copied its old contents out."""
    kv = KVCacheManager(5, BS, num_host_blocks=4)
    scheduler = Scheduler(SchedulerConfig(8, 2048), kv, max_model_len=1024)
    control = FakeChannel(D_ADDR)
    clock = Clock()
    side = DirectDecode(
        kv,
        scheduler,
        control,
        REGIONS,
        FP,
        1,
        1000,
        DisaggConfig(role="decode"),  # type: ignore[arg-type]
        clock=clock,
    )
    env = DEnv(kv, scheduler, control, clock, side)
    _running(env, "old", range(100, 108), max_tokens=8)  # names blocks 0 and 1 on D
    env.scheduler.finish("old", FinishReason.STOP)
    assert kv.device.num_cached_blocks == 2 and kv.num_free_blocks == 5
    # 4 blocks + its own ceil((16 + 1) / 4) - 4 = 1 == 5: takes the 3 free ones and evicts cached 1
    d_add(env, "new", prompt=range(500, 516), max_tokens=1)
    d_admit(env)
    assert kv.block_ids("new") == [2, 3, 4, 1]  # free blocks first, then the LRU (1 was freed before 0)
    # block 1 is being saved to the host tier: P must not write it before that copy ran on D
    assert control.take() == []
    ops = kv.take_ops()  # the next step plan carries the copy ...
    assert [d for d, _ in ops.swap_out] == [1]
    kv.end_step()  # ... and has run
    env.check()
    d_admit(env)
    [(_, dest)] = control.take()
    assert isinstance(dest, KVDest) and dest.block_ids == [2, 3, 4, 1]


# ---- P and D together ------------------------------------------------------------------


def test_p_and_d_end_to_end_over_fake_channels() -> None:
    p, d = make_p(budget=4), make_d()
    p_add(p, "req-p", room="room-1")
    request = d_add(d, "req-d", room="room-1")
    p_step(p)  # KVDest not there yet: tokens 0..3
    d_admit(d)
    [(to, kvdest)] = d.control.take()
    assert to == P_ADDR and isinstance(kvdest, KVDest) and kvdest.block_ids == [0, 1, 2]
    assert p.side.on_control(kvdest) == []
    # D allocated the same ids here as P did: the catch-up then the layer-wise send
    assert p_step(p) == ([send([0], [0], False, "room-1"), send([1], [1], True, "room-1")], [])
    assert p_step(p, token=77) == ([send([2], [2], True, "room-1")], [])
    [(to, done)] = p.control.take()
    assert to == D_ADDR and done == KVDone(room="room-1", first_token=77, tp_size=1, fingerprint=FP)
    assert isinstance(done, KVDone)
    assert d_control(d, done) == [RequestUpdate(request, [77], None, finished=False)]
    assert request.num_computed_tokens == 10 and d.scheduler.running == [request]
    assert_p_idle(p)
    d.scheduler.abort("req-d")
    assert_d_idle(d)


def test_p_holds_a_request_back_for_its_kvdest_at_most_dest_wait() -> None:
    env = make_p()
    env.side.dest_wait = 0.05
    first, second = p_request("r1", PROMPT), p_request("r2", PROMPT)
    env.side.add(first, TransferHandle(room="r1", peer=D_ADDR))
    env.side.add(second, TransferHandle(room="r2", peer=D_ADDR))
    assert env.side.take_ready() == []  # neither has its KVDest yet
    assert env.side.on_control(dest("r1")) == []
    assert env.side.take_ready() == [first]  # KVDest came: schedule it now, every block goes layer by layer
    env.clock.now += 0.049
    assert env.side.take_ready() == []
    env.clock.now += 0.002
    assert env.side.take_ready() == [second]  # waited long enough: prefill anyway, catch up later
    assert env.side.take_ready() == []
    third = p_request("r3", PROMPT)
    env.side.add(third, TransferHandle(room="r3", peer=D_ADDR))
    assert env.side.on_control(dest("r3")) == []
    assert env.side.abort("r3") is True  # never scheduled: it lived only here, and D is told
    assert [(a, m.room, m.status) for a, m in env.control.take()] == [(D_ADDR, "r3", "error")]  # type: ignore[attr-defined]
    assert env.side.abort("r1") is False  # scheduled: the scheduler finishes it
