"""Pool lookups and reads carried by the step plan (scheduler.pool_reads), as the engine core runs them:
one round trip per step. The fake worker (test_scheduler_prefix) runs a plan's cache ops and forward, then its
pool writes, then its pool reads, as the workers do; outputs are checked token for token against a reference
computed without any cache."""

from __future__ import annotations

from test_scheduler_prefix import BS, FakeWorker, make_request, make_scheduler, reference, seqs_of

from pdserve.kvcache.keys import chain_keys
from pdserve.messages import CacheOps, ForwardOutput, PoolRead, StepPlan
from pdserve.scheduler.scheduler import Scheduler, SchedulerOutput


class PlanWorker(FakeWorker):
    def execute(self, plan: StepPlan) -> ForwardOutput:
        output = super().execute(plan)  # copies, forward, pool writes
        output.pool_read = [self.read(read) for read in plan.pool_reads]
        return output

    def read(self, read: PoolRead) -> int:
        num = 0
        for i, key in enumerate(read.keys):
            if key not in self.pool:
                break
            if read.host_block_ids:
                self.host[read.host_block_ids[i]] = list(self.pool[key])
            num += 1
        return num


def engine_step(s: Scheduler, w: PlanWorker) -> SchedulerOutput:
    """EngineCore._step: one plan with the pool reads, executed unless it is empty."""
    sched = s.schedule(pool_reads=True)
    s.check_integrity()
    if not sched.plan.is_empty:
        s.update(sched, w.execute(sched.plan))
        s.check_integrity()
    return sched


def test_a_pool_hit_is_counted_read_then_admitted_one_step_each() -> None:
    s = make_scheduler(4, num_host_blocks=2, has_pool=True)
    w = PlanWorker(s)
    k = chain_keys(b"pdserve", list(range(10)), BS)
    a = make_request("a", range(10), 1)
    s.add_request(a)
    sched = engine_step(s, w)
    assert sched.plan.pool_reads == [PoolRead("a", [k[0].hex(), k[1].hex()])]  # a count: nothing is there yet
    assert seqs_of(sched) == {}  # a waits for its count
    sched = engine_step(s, w)
    assert sched.plan.pool_reads == [] and seqs_of(sched) == {"a": (0, list(range(10)), [0, 1, 2], True)}
    sched = engine_step(s, w)  # a finished: its prompt blocks are written through to the pool
    assert sched.plan.cache_ops.pool_put == [(0, k[0].hex()), (1, k[1].hex())]
    # c evicts a's blocks from the device and the host
    c = make_request("c", range(100, 116), 1)
    s.add_request(c)
    while s.has_work:
        engine_step(s, w)
    assert s.kv.host is not None and s.kv.host.lookup(k[0]) is None and s.kv.device.lookup(k[0]) is None

    # b repeats a's prompt: counted in one step, read into host blocks in the next, admitted in the third
    b = make_request("b", range(10), 1)
    s.add_request(b)
    first = engine_step(s, w)
    assert first.plan.pool_reads == [PoolRead("b", [k[0].hex(), k[1].hex()])] and seqs_of(first) == {}
    second = engine_step(s, w)
    [load] = second.plan.pool_reads
    assert load.keys == [k[0].hex(), k[1].hex()] and len(load.host_block_ids) == 2 and seqs_of(second) == {}
    third = engine_step(s, w)
    assert seqs_of(third) == {"b": (8, [8, 9], seqs_of(third)["b"][2], True)}
    assert sorted(third.plan.cache_ops.swap_in) == sorted(zip(load.host_block_ids, seqs_of(third)["b"][2][:2]))
    assert b.output_token_ids == a.output_token_ids == reference(range(10), 1)
    assert s.kv.stats.hit_tokens_pool == 8
    while s.has_work:
        engine_step(s, w)
    assert not s.requests and s.kv.num_free_blocks == s.kv.num_blocks


def test_a_count_that_finds_nothing_takes_no_host_block() -> None:
    s = make_scheduler(8, num_host_blocks=4, has_pool=True)
    w = PlanWorker(s)
    a = make_request("a", range(12), 1)
    s.add_request(a)
    assert s.kv.host is not None
    free_before = s.kv.host.num_free_blocks
    sched = engine_step(s, w)
    assert [r.host_block_ids for r in sched.plan.pool_reads] == [[]]
    assert s.kv.host.num_free_blocks == free_before  # nothing taken, nothing evicted
    sched = engine_step(s, w)
    assert sched.plan.pool_reads == [] and "a" in seqs_of(sched)
    assert a.output_token_ids == reference(range(12), 1)


def test_abort_while_a_read_is_in_flight_frees_its_host_blocks() -> None:
    s = make_scheduler(8, num_host_blocks=4, has_pool=True)
    w = PlanWorker(s)
    a = make_request("a", range(12), 1)
    s.add_request(a)
    while s.has_work:
        engine_step(s, w)
    assert len(w.pool) == 3
    # evict a's blocks from the host (the device keeps them, so drop those too: a fresh scheduler's view)
    s2 = make_scheduler(8, num_host_blocks=4, has_pool=True)
    w2 = PlanWorker(s2)
    w2.pool = dict(w.pool)
    b = make_request("b", range(12), 1)
    s2.add_request(b)
    engine_step(s2, w2)  # count: 2 leading blocks (the third holds the last token, never matched)
    sched = s2.schedule(pool_reads=True)  # the load is planned ...
    [load] = sched.plan.pool_reads
    assert len(load.host_block_ids) == 2
    s2.abort("b")  # ... and b is aborted while the workers read
    s2.update(sched, w2.execute(sched.plan))
    s2.check_integrity()
    assert s2.kv.host is not None and s2.kv.host.num_free_blocks == 4  # read blocks stay cached, unreferenced
    assert not s2.pool_reads.is_pending("b") and not s2.requests
    while s2.has_work:
        engine_step(s2, w2)
    assert s2.kv.num_free_blocks == s2.kv.num_blocks and sched.plan.cache_ops == CacheOps()
