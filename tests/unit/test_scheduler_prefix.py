"""Scheduler with prefix caching, a host tier and a pool, driven by a fake worker over a simulated KV cache.

The fake worker keeps, per block slot, a digest of the whole prefix up to that token (as real K/V depends
on every earlier token). A step writes the slots it computes, reading the slot before from the block
table; cache ops copy slots between device, host and pool in the documented order. The fake model
samples from the digest it reads back, so reusing a wrong block, missing a copy or running copies out of
order changes the output, which is checked token for token against a reference computed without any cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import pytest

from pdserve.config import SchedulerConfig
from pdserve.kvcache import KVCacheManager
from pdserve.kvcache.keys import chain_keys
from pdserve.kvcache.manager import PoolLoad
from pdserve.messages import CacheOps, ForwardOutput, ScheduledSeq, StepPlan
from pdserve.request import FinishReason, Request, SamplingParams
from pdserve.scheduler.scheduler import Scheduler, SchedulerOutput

BS = 4
START = 0


def digest(prev: int, token: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{prev},{token}".encode(), digest_size=8).digest(), "little")


def sample(state: int) -> int:
    return 1000 + state % 1000


def reference(prompt: Sequence[int], max_tokens: int) -> list[int]:
    """What the fake model generates with no cache at all."""
    state = START
    for token in prompt:
        state = digest(state, token)
    out = []
    for _ in range(max_tokens):
        out.append(sample(state))
        state = digest(state, out[-1])
    return out


Slots = list[list[int | None]]


class FakeWorker:
    def __init__(self, s: Scheduler) -> None:
        kv = s.kv
        self.device: Slots = [[None] * BS for _ in range(kv.num_blocks)]
        self.host: Slots = [[None] * BS for _ in range(kv.host.num_blocks if kv.host else 0)]
        self.pool: dict[str, list[int | None]] = {}
        self.num_tokens_computed = 0

    def load(self, loads: list[PoolLoad]) -> list[int]:
        """Read each load's leading keys present in the pool into its host blocks."""
        num_loaded = []
        for load in loads:
            n = 0
            for key, host_id in zip(load.keys, load.host_block_ids):
                if key.hex() not in self.pool:
                    break
                self.host[host_id] = list(self.pool[key.hex()])
                n += 1
            num_loaded.append(n)
        return num_loaded

    def _slot(self, seq: ScheduledSeq, pos: int) -> tuple[int, int]:
        return seq.block_ids[pos // BS], pos % BS

    def _read(self, seq: ScheduledSeq, pos: int) -> int:
        block_id, i = self._slot(seq, pos)
        state = self.device[block_id][i]
        assert state is not None, f"{seq.req_id} reads position {pos} from block {block_id}: never written"
        return state

    def execute(self, plan: StepPlan) -> ForwardOutput:
        ops = plan.cache_ops
        for device_id, host_id in ops.swap_out:
            self.host[host_id] = list(self.device[device_id])
        for host_id, device_id in ops.swap_in:
            self.device[device_id] = list(self.host[host_id])
        for src, dst in ops.device_copy:
            self.device[dst] = list(self.device[src])
        req_ids, token_ids = [], []
        for seq in plan.seqs:
            for i, token in enumerate(seq.token_ids):
                pos = seq.start_pos + i
                state = digest(self._read(seq, pos - 1) if pos else START, token)
                block_id, slot = self._slot(seq, pos)
                self.device[block_id][slot] = state
            self.num_tokens_computed += len(seq.token_ids)
            if seq.sample:
                req_ids.append(seq.req_id)
                token_ids.append(sample(self._read(seq, seq.start_pos + len(seq.token_ids) - 1)))
        for host_id, key in ops.pool_put:
            self.pool[key] = list(self.host[host_id])
        return ForwardOutput(step_id=plan.step_id, req_ids=req_ids, token_ids=token_ids)


def make_scheduler(
    num_blocks: int, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048, **kv_options: object
) -> Scheduler:
    """Prefix caching is on unless asked off."""
    kv_options.setdefault("enable_prefix_caching", True)
    kv = KVCacheManager(num_blocks, BS, **kv_options)  # type: ignore[arg-type]
    return Scheduler(SchedulerConfig(max_num_seqs, max_num_batched_tokens), kv, max_model_len=1024)


def make_request(req_id: str, prompt: Sequence[int], max_tokens: int) -> Request:
    return Request(req_id, tuple(prompt), SamplingParams(max_tokens=max_tokens, temperature=0))


def run_step(s: Scheduler, worker: FakeWorker) -> SchedulerOutput:
    """One engine step (EngineCore.step): pool reads, schedule, execute unless the plan is empty, update."""
    loads = s.plan_pool_loads()
    if loads:
        s.finish_pool_loads(loads, worker.load(loads))
    sched = s.schedule()
    s.check_integrity()
    if sched.plan.seqs or not sched.plan.cache_ops.is_empty:
        s.update(sched, worker.execute(sched.plan))
        s.check_integrity()  # also with pool writes of a finished request waiting for the next plan
    return sched


def run_all(s: Scheduler, worker: FakeWorker) -> list[SchedulerOutput]:
    steps = []
    while s.has_work:
        steps.append(run_step(s, worker))
        assert len(steps) < 100
    return steps


def assert_all_free(s: Scheduler) -> None:
    assert not s.has_work and not s.running and not s.waiting
    kv = s.kv
    assert kv.num_free_blocks == kv.num_blocks
    assert all(kv.device.ref_count(b) == 0 for b in range(kv.num_blocks))
    if kv.host is not None:
        assert kv.host.num_free_blocks == kv.host.num_blocks
        assert all(kv.host.ref_count(b) == 0 for b in range(kv.host.num_blocks))
    s.check_integrity()


def seqs_of(sched: SchedulerOutput) -> dict[str, tuple[int, list[int], list[int], bool]]:
    """req_id -> (start_pos, token_ids, block_ids, sample)"""
    return {q.req_id: (q.start_pos, q.token_ids, q.block_ids, q.sample) for q in sched.plan.seqs}


# ---- device prefix reuse ----------------------------------------------------------------


def test_same_prompt_again_starts_after_the_cached_prefix() -> None:
    s = make_scheduler(8)
    w = FakeWorker(s)
    prompt = list(range(10))
    a = make_request("a", prompt, max_tokens=3)
    s.add_request(a)
    steps = run_all(s, w)
    assert [seqs_of(x) for x in steps] == [
        {"a": (0, prompt, [0, 1, 2], True)},
        {"a": (10, [a.output_token_ids[0]], [0, 1, 2], True)},
        {"a": (11, [a.output_token_ids[1]], [0, 1, 2], True)},
    ]
    assert a.output_token_ids == reference(prompt, 3)
    assert s.kv.device.num_cached_blocks == 3  # 12 computed tokens: 3 full blocks, the last with 2 outputs

    b = make_request("b", prompt, max_tokens=3)
    s.add_request(b)
    first = run_step(s, w)
    # 10 tokens: 2 full blocks match, the third is new (free list [3, ...]); 2 tokens computed, then sampled
    assert seqs_of(first) == {"b": (8, [8, 9], [0, 1, 3], True)}
    assert first.num_new_tokens == {"b": 2}
    assert first.plan.finished_req_ids == ["a"]
    run_all(s, w)
    assert b.output_token_ids == a.output_token_ids

    # the next turn: prompt + 2 outputs + a new token; the block holding the outputs matches too
    c = make_request("c", [*prompt, *a.output_token_ids[:2], 77], max_tokens=3)
    s.add_request(c)
    first = run_step(s, w)
    assert seqs_of(first) == {"c": (12, [77], [0, 1, 2, 4], True)}
    run_all(s, w)
    assert c.output_token_ids == reference(c.prompt_token_ids, 3)

    assert s.stats.num_prompt_tokens == 10 + 2 + 1
    assert s.stats.num_recomputed_tokens == 0
    assert w.num_tokens_computed == (10 + 2) + (2 + 2) + (1 + 2)
    st = s.kv.stats
    assert (st.query_tokens, st.hit_tokens_device, st.hit_tokens_host, st.hit_tokens_pool) == (33, 20, 0, 0)
    assert_all_free(s)


def test_same_prompt_in_one_step_is_computed_twice() -> None:
    """A block is matchable only once computed: two requests admitted together share nothing."""
    s = make_scheduler(8)
    w = FakeWorker(s)
    prompt = list(range(9))
    a, b = make_request("a", prompt, 2), make_request("b", prompt, 2)
    s.add_request(a)
    s.add_request(b)
    first = run_step(s, w)
    assert seqs_of(first) == {"a": (0, prompt, [0, 1, 2], True), "b": (0, prompt, [3, 4, 5], True)}
    assert [s.kv.device.key_of(i) for i in range(6)] == [*chain_keys(b"pdserve", prompt, BS), None, None, None, None]
    run_all(s, w)
    assert a.output_token_ids == b.output_token_ids == reference(prompt, 2)
    assert s.kv.stats.hit_tokens_device == 0
    assert_all_free(s)


def test_chunked_prefill_after_a_prefix_hit() -> None:
    s = make_scheduler(8, max_num_batched_tokens=4)
    w = FakeWorker(s)
    a = make_request("a", range(9), 1)
    s.add_request(a)
    assert [seqs_of(x)["a"][:2] for x in run_all(s, w)] == [(0, [0, 1, 2, 3]), (4, [4, 5, 6, 7]), (8, [8])]
    b = make_request("b", [*range(8), *range(50, 56)], 1)
    s.add_request(b)
    steps = run_all(s, w)
    assert [seqs_of(x)["b"] for x in steps] == [
        (8, [50, 51, 52, 53], [0, 1, 3], False),  # the hit does not count against the budget
        (12, [54, 55], [0, 1, 3, 4], True),
    ]
    assert b.output_token_ids == reference(b.prompt_token_ids, 1)
    assert_all_free(s)


def test_a_block_saved_and_reused_in_one_step_keeps_both_contents() -> None:
    """swap_out runs before swap_in: device blocks evicted (saved) and swapped into in one plan."""
    s = make_scheduler(4, num_host_blocks=6)
    w = FakeWorker(s)
    a = make_request("a", range(8), 1)
    s.add_request(a)
    run_all(s, w)  # a's 2 blocks cached: device LRU [1, 0], free list [2, 3]
    x = make_request("x", range(100, 116), 1)
    s.add_request(x)
    (sched,) = run_all(s, w)
    assert seqs_of(sched) == {"x": (0, list(range(100, 116)), [2, 3, 1, 0], True)}
    assert sched.plan.cache_ops == CacheOps(swap_out=[(1, 0), (0, 1)])  # a's blocks to host 0 (k1), 1 (k0)

    b = make_request("b", [*range(8), 9], 1)  # a's prefix, now on the host only
    s.add_request(b)
    (sched,) = run_all(s, w)
    # x's blocks (LRU [0, 1, 3, 2]) are evicted tail first to host 2, 3, 4; 0 and 1 then receive a's prefix
    assert seqs_of(sched) == {"b": (8, [9], [0, 1, 3], True)}
    assert sched.plan.cache_ops == CacheOps(swap_out=[(0, 2), (1, 3), (3, 4)], swap_in=[(1, 0), (0, 1)])

    y = make_request("y", range(100, 116), 1)  # x's prompt: its first block on the device, 2 more on the host
    s.add_request(y)
    (sched,) = run_all(s, w)
    assert seqs_of(sched) == {"y": (12, [112, 113, 114, 115], [2, 3, 1, 0], True)}
    assert sched.plan.cache_ops == CacheOps(swap_in=[(4, 3), (3, 1)])
    for r in (a, x, b, y):
        assert r.output_token_ids == reference(r.prompt_token_ids, 1)
    st = s.kv.stats
    assert (st.query_tokens, st.hit_tokens_device, st.hit_tokens_host) == (8 + 16 + 9 + 16, 4, 8 + 8)
    assert w.num_tokens_computed == 8 + 16 + 1 + 4
    assert_all_free(s)


# ---- preemption -------------------------------------------------------------------------


def _preemption_run(**kv_options: object) -> tuple[Scheduler, FakeWorker, list[SchedulerOutput], list[Request]]:
    """6 blocks for a (8 tokens), b (7), c (7): a's growth preempts c in step 2; c comes back in step 5."""
    s = make_scheduler(6, num_host_blocks=8, **kv_options)  # type: ignore[arg-type]
    w = FakeWorker(s)
    reqs = [
        make_request("a", range(8), 4),
        make_request("b", range(100, 107), 4),
        make_request("c", range(200, 207), 3),
    ]
    for r in reqs:
        s.add_request(r)
    steps = run_all(s, w)
    for r in reqs:
        assert r.output_token_ids == reference(r.prompt_token_ids, r.sampling.max_tokens)
        assert r.finish_reason is FinishReason.LENGTH
    assert s.stats.num_preemptions == 1 and reqs[2].num_preemptions == 1
    assert [sorted(seqs_of(x)) for x in steps] == [["a", "b", "c"], ["a", "b"], ["a", "b"], ["a", "b"], ["c"], ["c"]]
    return s, w, steps, reqs


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_preempted_request_resumes_from_its_saved_blocks(prefix_caching: bool) -> None:
    s, w, steps, (a, _, c) = _preemption_run(enable_prefix_caching=prefix_caching)
    out0 = c.output_token_ids[0]
    # step 2: c (7 computed tokens, 1 full block) is saved before a reuses its blocks
    assert steps[1].plan.cache_ops == CacheOps(swap_out=[(4, 0)])
    assert seqs_of(steps[1])["a"] == (8, [a.output_token_ids[0]], [0, 1, 5], True)
    # step 5: c matches its saved block on the host and computes the rest of its 8 tokens
    assert seqs_of(steps[4]) == {"c": (4, [204, 205, 206, out0], [5, 4] if prefix_caching else [5, 1], True)}
    assert steps[4].plan.cache_ops == CacheOps(swap_in=[(0, 5)])
    assert steps[4].plan.finished_req_ids == ["a", "b"]
    if prefix_caching:  # c's last block evicts a's named block 1, which goes to the host
        assert steps[5].plan.cache_ops == CacheOps(swap_out=[(1, 1)])
    else:
        assert all(x.plan.cache_ops.is_empty for x in steps[2:4] + steps[5:])
    assert w.num_tokens_computed == 22 + 2 + 2 + 2 + 4 + 1
    assert s.stats.num_recomputed_tokens == 3  # c's tokens 4..6, computed before the preemption
    assert s.stats.num_prompt_tokens == 8 + 7 + 7 + 3
    assert s.kv.stats.blocks_saved_on_preemption == 1
    # with prefix caching off only c's readmission (8 tokens) looks up its own saved blocks
    assert (s.kv.stats.query_tokens, s.kv.stats.hit_tokens_host) == ((8 + 7 + 7 if prefix_caching else 0) + 8, 4)
    assert_all_free(s)


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_preempted_request_recomputes_everything_without_saving(prefix_caching: bool) -> None:
    s, w, steps, (_, _, c) = _preemption_run(enable_prefix_caching=prefix_caching, preempt_save=False)
    out0 = c.output_token_ids[0]
    assert seqs_of(steps[4]) == {"c": (0, [*range(200, 207), out0], [5, 4] if prefix_caching else [5, 1], True)}
    assert all(x.plan.cache_ops.is_empty for x in steps[:5])
    # eviction still saves named blocks to the host: c's last block evicts a's block 1 to host block 0
    assert steps[5].plan.cache_ops == (CacheOps(swap_out=[(1, 0)]) if prefix_caching else CacheOps())
    assert w.num_tokens_computed == 22 + 2 + 2 + 2 + 8 + 1  # 4 more than with saving
    assert s.stats.num_recomputed_tokens == 7
    assert s.stats.num_prompt_tokens == 8 + 7 + 7 + 7
    assert s.kv.stats.blocks_saved_on_preemption == 0
    assert s.kv.stats.hit_tokens_host == s.kv.stats.hit_tokens_device == 0
    assert_all_free(s)


# ---- the pool, and plans that carry only cache ops ----------------------------------------


def test_pool_round_trip_and_plans_with_only_cache_ops() -> None:
    s = make_scheduler(4, num_host_blocks=2, has_pool=True)
    w = FakeWorker(s)
    k = chain_keys(b"pdserve", list(range(10)), BS)
    kc = chain_keys(b"pdserve", list(range(100, 116)), BS)
    a = make_request("a", range(10), 1)
    s.add_request(a)
    sched = run_step(s, w)
    assert seqs_of(sched) == {"a": (0, list(range(10)), [0, 1, 2], True)}
    assert a.is_finished and not s.has_unfinished
    assert s.has_work  # a's prompt blocks still have to be written to the pool

    sched = run_step(s, w)  # executed although it computes nothing
    assert sched.plan.seqs == []
    assert sched.plan.finished_req_ids == ["a"]
    assert sched.plan.cache_ops == CacheOps(swap_out=[(0, 0), (1, 1)], pool_put=[(0, k[0].hex()), (1, k[1].hex())])
    assert sorted(w.pool) == sorted([k[0].hex(), k[1].hex()])
    assert not s.has_work
    empty = s.schedule()  # nothing to do: not executed, nothing to carry
    assert (empty.plan.seqs, empty.plan.finished_req_ids, empty.plan.cache_ops) == ([], [], CacheOps())
    assert_all_free(s)

    # c needs all 4 device blocks: a's cached blocks are evicted and go back to the host, already in the pool
    c = make_request("c", range(100, 116), 1)
    s.add_request(c)
    sched = run_step(s, w)
    assert seqs_of(sched) == {"c": (0, list(range(100, 116)), [3, 2, 1, 0], True)}
    # c's pool probe took both host blocks and found nothing, so a's blocks need new host copies (no puts)
    assert sched.plan.cache_ops == CacheOps(swap_out=[(1, 0), (0, 1)])
    sched = run_step(s, w)  # c's finish: 2 host blocks for 4 prompt blocks; the other 2 are not written
    assert sched.plan.cache_ops == CacheOps(swap_out=[(3, 0), (2, 1)], pool_put=[(0, kc[0].hex()), (1, kc[1].hex())])
    assert sched.plan.finished_req_ids == ["c"]
    assert not s.has_work

    # b repeats a's prompt: not on the device, not on the host, read back from the pool
    b = make_request("b", range(10), 1)
    s.add_request(b)
    sched = run_step(s, w)
    assert seqs_of(sched) == {"b": (8, [8, 9], [0, 1, 2], True)}
    assert sched.plan.cache_ops == CacheOps(swap_in=[(0, 0), (1, 1)])
    assert b.output_token_ids == a.output_token_ids == reference(range(10), 1)
    assert c.output_token_ids == reference(range(100, 116), 1)
    assert not s.has_work  # b's prompt blocks are known to the pool: nothing more to write
    st = s.kv.stats
    assert (st.query_tokens, st.hit_tokens_device, st.hit_tokens_host, st.hit_tokens_pool) == (36, 0, 0, 8)
    assert w.num_tokens_computed == 10 + 16 + 2
    assert_all_free(s)


def test_abort_with_a_pool_writes_computed_prompt_blocks_on_the_next_plan() -> None:
    s = make_scheduler(8, num_host_blocks=4, has_pool=True)
    w = FakeWorker(s)
    k = chain_keys(b"pdserve", list(range(12)), BS)
    s.add_request(make_request("a", range(12), 5))
    run_step(s, w)
    # a's pool probe before step 1 took host blocks 0, 1 and found nothing: host free list [2, 3, 0, 1]
    s.abort("a")
    assert s.has_work and not s.has_unfinished
    sched = run_step(s, w)
    assert (sched.plan.seqs, sched.plan.finished_req_ids) == ([], ["a"])
    assert sched.plan.cache_ops == CacheOps(
        swap_out=[(0, 2), (1, 3), (2, 0)], pool_put=[(2, k[0].hex()), (3, k[1].hex()), (0, k[2].hex())]
    )
    assert sorted(w.pool) == sorted(key.hex() for key in k)
    assert_all_free(s)


def test_pool_is_not_written_with_prefix_caching_off() -> None:
    s = make_scheduler(8, num_host_blocks=4, has_pool=True, enable_prefix_caching=False)
    w = FakeWorker(s)
    s.add_request(make_request("a", range(12), 2))
    steps = run_all(s, w)
    assert len(steps) == 2 and all(x.plan.cache_ops.is_empty for x in steps)
    assert w.pool == {}
    assert_all_free(s)


def test_check_integrity_holds_between_steps_with_pool_writes_pending() -> None:
    s = make_scheduler(8, num_host_blocks=4, has_pool=True)
    w = FakeWorker(s)
    s.add_request(make_request("a", range(10), 1))
    sched = s.schedule()
    s.update(sched, w.execute(sched.plan))
    assert s.has_work  # the writes are queued for the next plan, as documented
    s.check_integrity()


# ---- n > 1: a sibling forked onto its leader's computed prompt --------------------------------------------------


@pytest.mark.parametrize("prompt_len", [10, 8, 3])  # the last prompt token in a partial block, a full one, the first
def test_a_forked_sibling_computes_one_token_and_generates_as_without_cache(prompt_len: int) -> None:
    s = make_scheduler(num_blocks=16)
    worker = FakeWorker(s)
    prompt = list(range(100, 100 + prompt_len))
    leader = make_request("leader", prompt, 6)
    s.add_request(leader)
    run_step(s, worker)  # the whole prompt, and the leader's first token
    computed = worker.num_tokens_computed
    siblings = [make_request(f"sibling-{i}", prompt, 6) for i in range(2)]
    for sibling in siblings:
        assert s.fork(leader, sibling)
        assert sibling.num_computed_tokens == sibling.num_cached_tokens == prompt_len - 1
    s.check_integrity()
    sched = run_step(s, worker)
    assert sched.plan.cache_ops.device_copy, "the block holding the last prompt token is copied, not shared"
    assert worker.num_tokens_computed - computed == 1 + 2  # the leader's decode token, one prompt token each
    run_all(s, worker)
    for r in [leader, *siblings]:
        assert r.output_token_ids == reference(prompt, 6), r.req_id
    assert_all_free(s)


def test_a_fork_needs_the_leaders_blocks() -> None:
    s = make_scheduler(num_blocks=16)
    worker = FakeWorker(s)
    leader = make_request("leader", list(range(10)), 1)
    early = make_request("early", list(range(10)), 1)
    s.add_request(leader)
    assert not s.fork(leader, early)  # its prompt is not computed yet
    run_all(s, worker)  # max_tokens 1: it ends, and its blocks go back
    late = make_request("late", list(range(10)), 1)
    assert not s.fork(leader, late)
    assert "late" not in s.kv._tables and not s.kv.has_pending_ops
    s.add_request(late)  # the prefix cache serves it instead
    run_all(s, worker)
    assert late.output_token_ids == reference(range(10), 1) and late.num_cached_tokens == 8
    assert_all_free(s)


def test_a_one_token_prompt_is_not_forked() -> None:
    """Nothing of it is computed to share: the sibling computes its one token itself."""
    s = make_scheduler(num_blocks=16)
    worker = FakeWorker(s)
    leader = make_request("leader", [5], 3)
    s.add_request(leader)
    run_step(s, worker)
    sibling = make_request("sibling", [5], 3)
    assert not s.fork(leader, sibling)
    assert "sibling" not in s.kv._tables and not s.kv.has_pending_ops
    s.add_request(sibling)
    run_all(s, worker)
    assert sibling.output_token_ids == leader.output_token_ids == reference([5], 3)
    assert_all_free(s)


def test_a_forks_copy_runs_after_the_swap_out_of_the_block_it_reuses() -> None:
    """A device pool so small that the copy's target evicts a cached block: saved to the host first."""
    s = make_scheduler(num_blocks=4, num_host_blocks=8)
    worker = FakeWorker(s)
    other = make_request("other", [7] * 8, 1)
    s.add_request(other)
    run_all(s, worker)  # two named blocks stay cached on the device
    leader = make_request("leader", [1, 2, 3, 4, 5, 6], 4)
    s.add_request(leader)
    run_step(s, worker)  # on the two free blocks
    sibling = make_request("sibling", [1, 2, 3, 4, 5, 6], 4)
    assert s.fork(leader, sibling)
    ops = run_step(s, worker).plan.cache_ops
    assert ops.swap_out and ops.device_copy and ops.swap_out[0][0] == ops.device_copy[0][1], ops
    run_all(s, worker)
    assert leader.output_token_ids == sibling.output_token_ids == reference([1, 2, 3, 4, 5, 6], 4)
    again = make_request("again", [7] * 8, 1)  # the evicted blocks come back from the host
    s.add_request(again)
    run_all(s, worker)
    assert again.output_token_ids == reference([7] * 8, 1)
    assert_all_free(s)
