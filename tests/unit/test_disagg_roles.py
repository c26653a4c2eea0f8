"""The PD role and transfer-mode strategies, and P's transfer state machine: pure logic, no engine."""

from __future__ import annotations

import pytest

from pdserve.config import DisaggConfig, SchedulerConfig
from pdserve.disagg.direct import DirectDecode, DirectPrefill
from pdserve.disagg.prefill import TRANSITIONS, Outgoing, Phase
from pdserve.disagg.role import DecodeRole, MixedRole, PrefillRole, RoleContext, make_role
from pdserve.disagg.storage import StorageDecode, StoragePrefill
from pdserve.kvcache import KVCacheManager
from pdserve.messages import TransferHandle
from pdserve.request import FinishReason, Request, RequestStatus, SamplingParams
from pdserve.scheduler.scheduler import Scheduler


def context(num_host_blocks: int = 0) -> RoleContext:
    kv = KVCacheManager(16, 4, num_host_blocks=num_host_blocks, has_pool=bool(num_host_blocks))
    scheduler = Scheduler(SchedulerConfig(8, 64), kv, max_model_len=256)
    return RoleContext(kv, scheduler, "fp", 1, 1000, [[]], read_pool=lambda loads: [0] * len(loads))


def request(req_id: str = "r1") -> Request:
    return Request(req_id, (1, 2, 3, 4, 5), SamplingParams(max_tokens=4, temperature=0))


@pytest.mark.parametrize(
    "role, mode, role_type, side_type",
    [
        ("prefill", "direct", PrefillRole, DirectPrefill),
        ("prefill", "storage", PrefillRole, StoragePrefill),
        ("decode", "direct", DecodeRole, DirectDecode),
        ("decode", "storage", DecodeRole, StorageDecode),
    ],
)
def test_make_role_picks_the_role_and_the_mode(role: str, mode: str, role_type: type, side_type: type) -> None:
    pd = make_role(context(num_host_blocks=4), DisaggConfig(role=role, kv_transfer=mode))
    try:
        assert type(pd) is role_type and pd.name == role and pd.control_address.startswith("tcp://127.0.0.1:")
        side = pd.prefill if isinstance(pd, PrefillRole) else pd.decode  # type: ignore[attr-defined]
        assert type(side) is side_type
        assert pd.num_pending == 0 and not pd.has_work and len(pd.sockets) == 1
    finally:
        pd.close()


def test_mixed_role_is_a_null_object_that_refuses_pd_requests() -> None:
    pd = make_role(context(), DisaggConfig(role="mixed"))
    assert isinstance(pd, MixedRole) and pd.control_address == "" and pd.sockets == []
    with pytest.raises(ValueError, match="runs --role mixed and takes no kv_transfer_params"):
        pd.add(request(), TransferHandle(room="r1", peer="tcp://127.0.0.1:1"))
    assert pd.before_step() == [] and pd.abort("r1") is False and pd.num_pending == 0


def test_prefill_role_parks_the_request_in_the_scheduler_until_it_is_ready() -> None:
    ctx = context()
    pd = make_role(ctx, DisaggConfig(role="prefill", kv_dest_wait=60.0))
    try:
        r = request()
        pd.add(r, TransferHandle(room="room", peer="tcp://127.0.0.1:1"))
        assert ctx.scheduler.parked == {"r1": r} and "r1" not in ctx.scheduler.requests
        assert r.sampling.max_tokens == 1 and r.status is RequestStatus.WAITING  # P samples the first token only
        with pytest.raises(ValueError, match="'r1' is already in use"):
            pd.add(request(), TransferHandle(room="other", peer="tcp://127.0.0.1:1"))
        assert pd.before_step() == [] and ctx.scheduler.parked == {"r1": r}  # no KVDest, the wait is not over
        assert pd.abort("r1") is True  # it lived only here
        assert r.status is RequestStatus.FINISHED and r.finish_reason is FinishReason.ABORT
        assert not ctx.scheduler.parked and pd.num_pending == 0
    finally:
        pd.close()


def test_decode_side_hears_of_preemptions_from_the_scheduler() -> None:
    ctx = context()
    pd = make_role(ctx, DisaggConfig(role="decode", reserve_ratio_init=1.0, reserve_ratio_decay=0.5))
    try:
        assert isinstance(pd, DecodeRole)
        pd.decode.on_step()
        assert pd.decode.reserve.ratio == 0.5
        for listener in ctx.scheduler.preemption_listeners:
            listener(request())
        assert pd.decode.reserve.ratio == 1.0
    finally:
        pd.close()


def test_the_transition_table_refuses_a_move_it_does_not_list() -> None:
    out = Outgoing(request(), TransferHandle(room="r", peer="p"), deadline=0.0)
    assert out.phase is Phase.QUEUED and not out.is_scheduled
    with pytest.raises(AssertionError, match="no move from QUEUED to WRITTEN"):
        out.move(Phase.WRITTEN)
    out.move(Phase.PREFILLING)
    out.move(Phase.HELD)
    out.move(Phase.WRITING)
    assert out.is_staged and not out.is_written
    out.move(Phase.WRITTEN)
    assert out.is_written
    assert TRANSITIONS[Phase.WRITTEN] == frozenset()  # the end: the transfer leaves the tables
    assert all(phase in TRANSITIONS for phase in Phase)
