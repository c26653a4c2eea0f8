"""KVCacheManager over a device tier, a host tier and a pool: prefix reuse, the recorded CacheOps, pool
loads, preemption saves and statistics, with exact block ids. No tensors: ops are checked as recorded."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from pdserve.kvcache import BlockPool, KVCacheManager
from pdserve.kvcache.keys import chain_keys
from pdserve.kvcache.manager import CacheStats, MatchResult, PoolLoad
from pdserve.messages import CacheOps
from pdserve.request import Request, SamplingParams

BS = 4
ROOT = b"pdserve"  # the manager's default root


def make_request(req_id: str, tokens: Sequence[int], outputs: Sequence[int] = ()) -> Request:
    request = Request(req_id, tuple(tokens), SamplingParams(max_tokens=16, temperature=0))
    request.output_token_ids.extend(outputs)
    return request


def host(kv: KVCacheManager) -> BlockPool:
    assert kv.host is not None
    return kv.host


def keys(tokens: Sequence[int]) -> list[bytes]:
    return chain_keys(ROOT, list(tokens), BS)


def admit(kv: KVCacheManager, request: Request, num_tokens: int | None = None) -> MatchResult:
    """What the scheduler does at admission: match, allocate with the match, start after the cached prefix."""
    match = kv.match(request)
    assert kv.allocate_slots(request, request.num_tokens if num_tokens is None else num_tokens, match=match)
    request.num_computed_tokens = match.num_blocks * BS
    kv.check_integrity()
    return match


def compute(kv: KVCacheManager, request: Request, num_tokens: int | None = None) -> None:
    """A step computed the request up to `num_tokens` (all of it by default)."""
    request.num_computed_tokens = request.num_tokens if num_tokens is None else num_tokens
    kv.cache_computed(request)
    kv.check_integrity()


def step(kv: KVCacheManager) -> CacheOps:
    """Send the recorded ops with a plan and run it."""
    ops = kv.take_ops()
    kv.end_step()
    kv.check_integrity()
    return ops


def assert_all_free(kv: KVCacheManager) -> None:
    assert not kv._tables and not kv.has_pending_ops
    assert kv.tiers._refs_pending == [] and kv.tiers._refs_in_flight == []
    assert kv.num_free_blocks == kv.device.num_blocks
    assert all(kv.device.ref_count(b) == 0 for b in range(kv.device.num_blocks))
    if kv.host is not None:
        assert host(kv).num_free_blocks == host(kv).num_blocks
        assert all(host(kv).ref_count(b) == 0 for b in range(host(kv).num_blocks))
    kv.check_integrity()


# ---- device tier ---------------------------------------------------------------------


def test_device_prefix_match_shares_blocks_by_reference() -> None:
    kv = KVCacheManager(8, BS)
    a = make_request("a", range(10))
    b = make_request("b", [*range(8), 50, 51, 52])
    ka = keys(range(10))
    assert admit(kv, a) == MatchResult()
    assert kv.block_ids("a") == [0, 1, 2]
    compute(kv, a)  # 2 full blocks: named; the third holds 2 tokens
    assert [kv.device.key_of(b) for b in (0, 1, 2)] == [ka[0], ka[1], None]

    assert admit(kv, b) == MatchResult([0, 1], [])
    assert kv.block_ids("b") == [0, 1, 3]
    assert b.num_computed_tokens == 8
    assert [kv.device.ref_count(i) for i in range(4)] == [2, 2, 1, 1]
    assert kv.stats == CacheStats(query_tokens=21, hit_tokens_device=8)

    kv.free(a)  # block 2 (unnamed) is free again; 0 and 1 stay with b
    kv.check_integrity()
    assert [kv.device.ref_count(i) for i in range(4)] == [1, 1, 0, 1]
    assert kv.num_free_blocks == 5 and kv.device.num_cached_blocks == 0
    compute(kv, b)
    assert kv.device.key_of(3) is None  # 11 tokens: still 2 full blocks
    kv.free(b)  # tail first: 3 to the free list, then 1 and 0 cached, 0 the most recent
    assert (kv.num_free_blocks, kv.device.num_cached_blocks) == (8, 2)
    assert not kv.has_pending_ops  # no host tier: nothing to record

    c = make_request("c", range(100, 132))  # all 8 blocks: free list [4, 5, 6, 7, 2, 3], then evict 1, then 0
    assert admit(kv, c) == MatchResult()
    assert kv.block_ids("c") == [4, 5, 6, 7, 2, 3, 1, 0]
    assert kv.device.lookup(ka[0]) is None and kv.device.lookup(ka[1]) is None
    kv.free(c)
    assert_all_free(kv)


def test_a_full_hit_recomputes_the_block_of_the_last_token() -> None:
    kv = KVCacheManager(8, BS)
    a = make_request("a", range(8))
    k = keys(range(9))
    admit(kv, a)
    compute(kv, a)
    assert [kv.device.key_of(b) for b in (0, 1)] == k[:2]
    kv.free(a)

    b = make_request("b", range(8))  # exactly 2 blocks: the last token's block is computed again
    assert kv.match(b) == MatchResult([0], [])
    assert admit(kv, b) == MatchResult([0], [])
    assert kv.block_ids("b") == [0, 2]
    assert b.num_computed_tokens == 4
    c = make_request("c", range(9))  # one token more: both blocks match
    assert admit(kv, c) == MatchResult([0, 1], [])
    assert kv.block_ids("c") == [0, 1, 3]
    assert kv.match(make_request("d", range(4))) == MatchResult()  # one block, one token short of two
    assert kv.match(make_request("e", range(3))) == MatchResult()

    compute(kv, b)
    assert kv.device.key_of(2) is None  # k[1] is already block 1's: the first block computed keeps a key
    assert kv.device.lookup(k[1]) == 1
    kv.free(b)
    kv.free(c)
    assert kv.stats == CacheStats(query_tokens=8 + 8 + 9, hit_tokens_device=4 + 8)
    assert_all_free(kv)


def _cached_prefix_and_one_free_block() -> tuple[KVCacheManager, list[bytes]]:
    """5 blocks: a's 2 named blocks cached (LRU [1, 0]), x holds [2, 3], block 4 free."""
    kv = KVCacheManager(5, BS)
    a = make_request("a", range(8))
    admit(kv, a)
    compute(kv, a)
    kv.free(a)
    admit(kv, make_request("x", range(100, 108)))
    assert kv.block_ids("x") == [2, 3]
    assert (kv.num_free_blocks, kv.device.num_cached_blocks) == (3, 2)
    return kv, keys(range(8))


def test_allocation_with_a_match_is_all_or_nothing() -> None:
    kv, k = _cached_prefix_and_one_free_block()
    stats = CacheStats(**vars(kv.stats))
    b = make_request("b", [*range(8), *range(60, 68)])  # matches [0, 1], needs 2 more, 1 is free
    match = kv.match(b)
    assert match == MatchResult([0, 1], [])
    assert not kv.allocate_slots(b, 16, match=match)
    assert kv.block_ids("b") == [] and "b" not in kv._tables
    assert [kv.device.ref_count(i) for i in range(5)] == [0, 0, 1, 1, 0]  # the matched refs are undone
    assert (kv.num_free_blocks, kv.device.num_cached_blocks) == (3, 2)
    assert [kv.device.lookup(key) for key in k] == [0, 1]
    assert kv.stats == stats  # a failed admission is not a query
    kv.check_integrity()

    c = make_request("c", [*range(8), 9])  # needs 1 more: fits, but not with a reserve of 1
    match = kv.match(c)
    assert not kv.allocate_slots(c, 9, reserve=1, match=match)
    assert [kv.device.ref_count(i) for i in range(5)] == [0, 0, 1, 1, 0]
    assert kv.allocate_slots(c, 9, match=match)
    assert kv.block_ids("c") == [0, 1, 4]
    with pytest.raises(RuntimeError, match="request c already holds blocks; a match applies only at admission"):
        kv.allocate_slots(c, 9, match=MatchResult())
    kv.free(c)
    kv.free(make_request("x", range(100, 108)))  # the manager knows a request by its id
    assert_all_free(kv)


def test_failed_allocation_with_a_match_keeps_the_eviction_order() -> None:
    kv, k = _cached_prefix_and_one_free_block()
    b = make_request("b", [*range(8), *range(60, 68)])
    assert not kv.allocate_slots(b, 16, match=kv.match(b))
    # Before the failed attempt the LRU was [1, 0]: the tail goes first, the shared first block last.
    y = make_request("y", range(200, 208))  # 2 blocks: free block 4, then one eviction
    admit(kv, y)
    assert kv.block_ids("y") == [4, 1]
    assert kv.match(make_request("z", [*range(8), 1])) == MatchResult([0], [])  # the prefix root survives


def test_matching_never_evicts_the_blocks_it_reuses() -> None:
    kv = KVCacheManager(4, BS)
    a = make_request("a", range(12))
    ka = keys(range(12))
    admit(kv, a)
    compute(kv, a)
    kv.free(a)  # LRU [2, 1, 0], free list [3]: evicting 2 blocks would take 2 and 1
    b = make_request("b", [*range(8), *range(70, 78)])
    assert admit(kv, b) == MatchResult([0, 1], [])
    assert kv.block_ids("b") == [0, 1, 3, 2]  # 0 and 1 are referenced first; only 2 is evicted
    assert [kv.device.lookup(key) for key in ka] == [0, 1, None]
    assert kv.num_free_blocks == 0
    kv.free(b)
    assert_all_free(kv)


# ---- device <-> host ---------------------------------------------------------------------


def test_eviction_saves_to_host_and_a_later_match_swaps_in() -> None:
    kv = KVCacheManager(4, BS, num_host_blocks=4)
    k = keys(range(8))
    a = make_request("a", range(8))
    admit(kv, a)
    compute(kv, a)
    kv.free(a)  # device LRU [1, 0], free list [2, 3]
    assert not kv.has_pending_ops

    c = make_request("c", range(100, 116))
    admit(kv, c)
    assert kv.block_ids("c") == [2, 3, 1, 0]
    assert kv.has_pending_ops
    assert [host(kv).lookup(key) for key in k] == [1, 0]  # evicted tail first: k[1] got host block 0
    assert [host(kv).ref_count(h) for h in range(4)] == [1, 1, 0, 0]  # held until the plan has run
    ops = kv.take_ops()
    assert ops == CacheOps(swap_out=[(1, 0), (0, 1)])
    assert not kv.has_pending_ops
    assert [host(kv).ref_count(h) for h in range(4)] == [1, 1, 0, 0]
    kv.end_step()
    assert [host(kv).ref_count(h) for h in range(4)] == [0, 0, 0, 0]
    assert (host(kv).num_free_blocks, host(kv).num_cached_blocks) == (4, 2)
    kv.free(c)  # nothing computed: free list [0, 1, 3, 2]

    b = make_request("b", [*range(8), 90])
    match = admit(kv, b)
    assert match == MatchResult([], [1, 0])
    assert kv.block_ids("b") == [0, 1, 3]
    assert b.num_computed_tokens == 8
    assert [kv.device.key_of(d) for d in (0, 1, 3)] == [k[0], k[1], None]  # named: data arrives before the forward
    assert [host(kv).ref_count(h) for h in range(4)] == [1, 1, 0, 0]
    assert step(kv) == CacheOps(swap_in=[(1, 0), (0, 1)])
    assert kv.stats == CacheStats(query_tokens=8 + 16 + 9, hit_tokens_host=8)

    compute(kv, b)
    kv.free(b)
    assert not kv.has_pending_ops  # no pool: a finish records nothing
    assert (kv.device.num_cached_blocks, host(kv).num_cached_blocks) == (2, 2)
    assert_all_free(kv)


def test_match_takes_the_device_run_then_continues_on_host() -> None:
    kv = KVCacheManager(3, BS, num_host_blocks=2)
    k = keys(range(8))
    a = make_request("a", range(8))
    admit(kv, a)
    compute(kv, a)
    kv.free(a)  # LRU [1, 0], free list [2]
    x = make_request("x", range(100, 108))
    admit(kv, x)
    assert kv.block_ids("x") == [2, 1]
    assert step(kv) == CacheOps(swap_out=[(1, 0)])
    kv.free(x)  # free list [1, 2]

    b = make_request("b", [*range(8), 90])
    assert admit(kv, b) == MatchResult([0], [0])
    assert kv.block_ids("b") == [0, 1, 2]
    assert kv.device.key_of(1) == k[1]
    assert step(kv) == CacheOps(swap_in=[(0, 1)])
    assert kv.stats == CacheStats(query_tokens=8 + 8 + 9, hit_tokens_device=4, hit_tokens_host=4)
    kv.free(b)
    assert_all_free(kv)


def test_host_hits_need_a_device_block_each() -> None:
    kv = KVCacheManager(4, BS, num_host_blocks=2)
    a = make_request("a", range(8))
    admit(kv, a)
    compute(kv, a)
    kv.free(a)
    admit(kv, x := make_request("x", range(100, 116)))  # evicts both: host [k1 -> 0, k0 -> 1]
    step(kv)
    kv.free(x)
    b = make_request("b", [*range(8), 90])
    match = kv.match(b)
    assert match == MatchResult([], [1, 0])
    assert not kv.allocate_slots(b, 4, match=match)  # 4 tokens take one block; two hits need two to swap into
    assert "b" not in kv._tables and not kv.has_pending_ops
    assert [host(kv).ref_count(h) for h in range(2)] == [0, 0]
    kv.check_integrity()
    assert_all_free(kv)


def test_host_blocks_of_in_flight_ops_are_not_evicted_until_end_step() -> None:
    kv = KVCacheManager(4, BS, num_host_blocks=2)
    k = keys(range(12))
    a = make_request("a", range(12))
    admit(kv, a)
    compute(kv, a)
    kv.free(a)  # device LRU [2, 1, 0], free list [3]

    admit(kv, make_request("x", range(100, 108)))  # evicts 2
    ops = kv.take_ops()  # the plan carrying (2 -> host 0) is running
    assert ops == CacheOps(swap_out=[(2, 0)])
    admit(kv, make_request("y", range(200, 204)))  # evicts 1 -> host 1, the last host block
    admit(kv, make_request("z", range(300, 304)))  # evicts 0: both host blocks are busy, so it is dropped
    assert (kv.block_ids("x"), kv.block_ids("y"), kv.block_ids("z")) == ([3, 2], [1], [0])
    assert [host(kv).lookup(key) for key in k] == [None, 1, 0]
    assert [host(kv).ref_count(h) for h in range(2)] == [1, 1]

    kv.end_step()  # releases host 0 (in flight), not host 1 (recorded after the plan was taken)
    assert [host(kv).ref_count(h) for h in range(2)] == [0, 1]
    kv.check_integrity()
    assert step(kv) == CacheOps(swap_out=[(1, 1)])
    assert [host(kv).ref_count(h) for h in range(2)] == [0, 0]

    for req_id in ("x", "y", "z"):
        kv.free(make_request(req_id, []))
    b = make_request("b", [*range(12), 1])
    assert kv.match(b) == MatchResult()  # k[0] was dropped: k[1] and k[2] on the host are unreachable
    w = make_request("w", [*range(400, 404)])
    admit(kv, w)
    compute(kv, w)
    kv.free(w)  # named on the device now
    admit(kv, make_request("v", range(500, 516)))  # evicts w's block to host: host 0 (k[2], LRU oldest) goes
    assert [host(kv).lookup(key) for key in k] == [None, 1, None]
    assert host(kv).lookup(keys(range(400, 404))[0]) == 0
    step(kv)
    kv.free(make_request("v", []))
    assert_all_free(kv)


# ---- pool ----------------------------------------------------------------------------


@pytest.mark.parametrize("cache_output", [False, True])
def test_pool_write_through_at_finish(cache_output: bool) -> None:
    kv = KVCacheManager(8, BS, num_host_blocks=4, has_pool=True, cache_output=cache_output)
    a = make_request("a", range(10))
    admit(kv, a)
    compute(kv, a)
    a.output_token_ids.extend(range(1000, 1006))  # finished after 6 tokens: the last one is never computed
    assert kv.allocate_slots(a, 15)
    compute(kv, a, 15)
    assert kv.block_ids("a") == [0, 1, 2, 3]
    k = keys(a.all_token_ids)  # k[2] covers prompt tokens 8, 9 and outputs 1000, 1001
    assert [kv.device.key_of(b) for b in range(4)] == [k[0], k[1], k[2], None]
    assert not kv.has_pending_ops  # nothing is written while a request runs

    kv.free(a)
    expected = CacheOps(swap_out=[(0, 0), (1, 1)], pool_put=[(0, k[0].hex()), (1, k[1].hex())])
    if cache_output:
        expected = CacheOps(
            swap_out=[(0, 0), (1, 1), (2, 2)], pool_put=[(0, k[0].hex()), (1, k[1].hex()), (2, k[2].hex())]
        )
    assert step(kv) == expected
    assert kv.device.num_cached_blocks == 3  # the device keeps them too

    b = make_request("b", range(10), outputs=[2000])  # the same prompt again: its blocks are known to the pool
    assert admit(kv, b) == MatchResult([0, 1], [])
    compute(kv, b)
    kv.free(b)
    assert not kv.has_pending_ops
    assert kv.stats == CacheStats(query_tokens=10 + 11, hit_tokens_device=8)
    assert_all_free(kv)


def test_device_eviction_writes_through_once() -> None:
    """Evicted named blocks go to the host and on to the pool; keys the pool has are not put again."""
    kv = KVCacheManager(4, BS, num_host_blocks=4, has_pool=True)
    a = make_request("a", range(8), outputs=range(1000, 1005))
    admit(kv, a, 12)
    compute(kv, a, 12)  # 3 named blocks: 2 of prompt, 1 of output
    k = keys(a.all_token_ids)
    kv.free(a)  # finish: the 2 prompt blocks are written
    assert step(kv) == CacheOps(swap_out=[(0, 0), (1, 1)], pool_put=[(0, k[0].hex()), (1, k[1].hex())])
    admit(kv, c := make_request("c", range(100, 116)))  # evicts 2, 1, 0 (LRU, tail first)
    assert kv.block_ids("c") == [3, 2, 1, 0]
    # only the output block is new to the host and the pool; 1 and 0 are found on the host
    assert step(kv) == CacheOps(swap_out=[(2, 2)], pool_put=[(2, k[2].hex())])
    assert [host(kv).lookup(key) for key in k[:3]] == [0, 1, 2]
    kv.free(c)
    assert_all_free(kv)


def test_pool_load_names_only_the_blocks_read_completely() -> None:
    kv = KVCacheManager(8, BS, num_host_blocks=4, has_pool=True)
    r = make_request("r", range(13))
    k = keys(range(13))
    load = kv.plan_pool_load(r)
    assert load == PoolLoad("r", [k[0], k[1], k[2]], [0, 1, 2])
    assert [host(kv).ref_count(h) for h in range(4)] == [1, 1, 1, 0]  # held: neither matchable nor evictable
    assert kv.match(r) == MatchResult()
    kv.check_integrity()

    kv.finish_pool_load(load, 2)  # every rank read the first 2
    kv.check_integrity()
    assert [host(kv).lookup(key) for key in k] == [0, 1, None]
    # the blocks read stay held for r until its admission, so no other admission can evict them
    assert [host(kv).ref_count(h) for h in range(4)] == [1, 1, 0, 0]
    assert (host(kv).num_free_blocks, host(kv).num_cached_blocks) == (2, 0)
    assert kv.match(r) == MatchResult([], [0, 1], num_pool_blocks=2)

    assert admit(kv, r) == MatchResult([], [0, 1], num_pool_blocks=2)
    assert kv.block_ids("r") == [0, 1, 2, 3]
    assert r.num_computed_tokens == 8
    assert step(kv) == CacheOps(swap_in=[(0, 0), (1, 1)])
    assert kv.stats == CacheStats(query_tokens=13, hit_tokens_pool=8)
    compute(kv, r)
    kv.free(r)  # finish: k[0], k[1] came from the pool, k[2] is new
    assert step(kv) == CacheOps(swap_out=[(2, 3)], pool_put=[(3, k[2].hex())])
    # host free list was [3, 2]: block 2 was freed unread
    assert_all_free(kv)


def test_pool_and_host_hits_are_attributed_separately() -> None:
    kv = KVCacheManager(8, BS, num_host_blocks=4, has_pool=True)
    k = keys(range(13))
    first = make_request("first", range(5))
    load = kv.plan_pool_load(first)
    assert load == PoolLoad("first", [k[0]], [0])
    kv.finish_pool_load(load, 1)
    kv.free(first)  # it goes away before admission (e.g. aborted)

    r = make_request("r", range(13))
    load = kv.plan_pool_load(r)  # k[0] is on the host now: load from k[1] on
    assert load == PoolLoad("r", [k[1], k[2]], [1, 2])
    kv.finish_pool_load(load, 1)
    assert [host(kv).lookup(key) for key in k] == [0, 1, None]
    assert admit(kv, r) == MatchResult([], [0, 1], num_pool_blocks=1)
    assert kv.stats == CacheStats(query_tokens=13, hit_tokens_host=4, hit_tokens_pool=4)
    assert step(kv) == CacheOps(swap_in=[(0, 0), (1, 1)])
    kv.free(r)  # nothing computed beyond the hits: k[0], k[1] known to the pool
    assert not kv.has_pending_ops
    assert_all_free(kv)


def test_pool_load_never_evicts_the_host_hits_it_extends() -> None:
    kv = KVCacheManager(8, BS, num_host_blocks=2, has_pool=True)
    k = keys(range(13))
    first = make_request("first", range(5))
    load = kv.plan_pool_load(first)
    assert load is not None
    kv.finish_pool_load(load, 1)  # host 0 = k[0]; host free list [1]
    kv.free(first)
    r = make_request("r", range(13))
    load = kv.plan_pool_load(r)
    assert load == PoolLoad("r", [k[1]], [1])  # one block left for the two keys after the host hit
    assert host(kv).lookup(k[0]) == 0
    kv.finish_pool_load(load, 0)  # the pool had nothing
    assert kv.match(r) == MatchResult([], [0], num_pool_blocks=0)
    kv.free(r)
    assert_all_free(kv)


def test_no_pool_load_when_there_is_nothing_to_read() -> None:
    r = make_request("r", range(13))
    assert KVCacheManager(8, BS, num_host_blocks=4).plan_pool_load(r) is None  # no pool
    off = KVCacheManager(8, BS, num_host_blocks=4, has_pool=True, enable_prefix_caching=False)
    assert off.plan_pool_load(r) is None
    assert (
        KVCacheManager(8, BS, num_host_blocks=4, has_pool=True).plan_pool_load(make_request("s", range(4))) is None
    )  # a one-block prompt has no matchable block

    kv = KVCacheManager(8, BS, num_host_blocks=2, has_pool=True)
    load = kv.plan_pool_load(make_request("q", range(9)))
    assert load is not None
    kv.finish_pool_load(load, 2)  # k[0], k[1] on the host
    kv.free(make_request("q", []))
    assert kv.plan_pool_load(make_request("t", range(9))) is None  # both matchable blocks are hits
    held = kv.plan_pool_load(make_request("u", range(100, 113)))  # takes both host blocks (evicting k[0], k[1])
    assert held is not None and held.host_block_ids == [0, 1]
    assert kv.plan_pool_load(make_request("v", range(200, 213))) is None  # no host block left
    kv.finish_pool_load(held, 0)
    kv.free(make_request("u", []))
    assert_all_free(kv)


def test_pool_needs_a_host_tier() -> None:
    with pytest.raises(ValueError, match="a pool needs a host tier to stage its blocks"):
        KVCacheManager(8, BS, has_pool=True)


# ---- preemption -----------------------------------------------------------------------------


def test_preemption_saves_computed_full_blocks_and_readmission_swaps_them_in() -> None:
    kv = KVCacheManager(4, BS, num_host_blocks=8, enable_prefix_caching=False)
    v = make_request("v", range(10))
    k = keys(range(10))
    admit(kv, v)
    compute(kv, v)
    assert [kv.device.key_of(b) for b in range(3)] == [None, None, None]  # prefix caching off: nothing named
    kv.free(v, preempted=True)
    v.num_computed_tokens = 0
    assert kv.stats.blocks_saved_on_preemption == 2
    assert [host(kv).lookup(key) for key in k] == [0, 1]
    assert kv.match(make_request("w", range(10))) == MatchResult()  # others do not share with prefix caching off
    assert kv.match(v) == MatchResult([], [0, 1])  # v matches what was saved for it
    assert step(kv) == CacheOps(swap_out=[(0, 0), (1, 1)])  # before the device blocks are reused

    assert admit(kv, v) == MatchResult([], [0, 1])  # device free list [3, 2, 1, 0]
    assert kv.block_ids("v") == [3, 2, 1]
    assert v.num_computed_tokens == 8
    assert [kv.device.key_of(b) for b in (3, 2)] == [None, None]
    assert step(kv) == CacheOps(swap_in=[(0, 3), (1, 2)])
    # with prefix caching off only the readmission of a preempted request looks anything up
    assert kv.stats == CacheStats(query_tokens=10, hit_tokens_host=8, blocks_saved_on_preemption=2)
    compute(kv, v)
    kv.free(v)
    assert kv.match(v) == MatchResult()  # finished: no longer saved
    assert_all_free(kv)


def test_preemption_with_prefix_caching_resumes_from_the_device_copy() -> None:
    kv = KVCacheManager(8, BS, num_host_blocks=8)
    v = make_request("v", range(10))
    admit(kv, v)
    compute(kv, v)
    v.output_token_ids.append(1000)  # sampled; preempted before it was computed
    kv.free(v, preempted=True)
    v.num_computed_tokens = 0
    assert step(kv) == CacheOps(swap_out=[(0, 0), (1, 1)])
    assert kv.device.num_cached_blocks == 2
    assert admit(kv, v) == MatchResult([0, 1], [])  # still on the device: no swap in
    assert kv.block_ids("v") == [0, 1, 3]  # free list [3, 4, 5, 6, 7, 2]
    assert not kv.has_pending_ops
    kv.free(v)
    assert kv.stats == CacheStats(query_tokens=10 + 11, hit_tokens_device=8, blocks_saved_on_preemption=2)
    assert_all_free(kv)


def test_preemption_without_saving_drops_the_victims_unshared_blocks() -> None:
    kv = KVCacheManager(8, BS, num_host_blocks=4, preempt_save=False)
    a = make_request("a", range(8))
    ka = keys(range(8))
    admit(kv, a)
    compute(kv, a)
    v = make_request("v", [*range(8), *range(20, 28)])
    kv_keys = keys(v.all_token_ids)
    assert admit(kv, v) == MatchResult([0, 1], [])
    compute(kv, v)
    assert kv.block_ids("v") == [0, 1, 2, 3]
    assert [kv.device.key_of(b) for b in range(4)] == [*ka, kv_keys[2], kv_keys[3]]
    kv.free(v, preempted=True)
    v.num_computed_tokens = 0
    kv.check_integrity()
    assert not kv.has_pending_ops
    assert kv.stats.blocks_saved_on_preemption == 0
    assert [kv.device.lookup(key) for key in kv_keys] == [0, 1, None, None]  # a's blocks stay, v's own are gone
    assert [kv.device.ref_count(b) for b in range(4)] == [1, 1, 0, 0]
    assert kv.device.num_cached_blocks == 0
    assert kv.match(v) == MatchResult([0, 1], [])  # what a shares is still matched
    kv.free(a)
    assert_all_free(kv)


def test_preempt_save_needs_a_host_tier() -> None:
    kv = KVCacheManager(4, BS, enable_prefix_caching=False)  # preempt_save defaults to True
    assert not kv.preempt_save
    v = make_request("v", range(10))
    admit(kv, v)
    compute(kv, v)
    kv.free(v, preempted=True)
    v.num_computed_tokens = 0
    assert kv.match(v) == MatchResult()
    assert kv.stats.blocks_saved_on_preemption == 0
    assert_all_free(kv)


def test_preemption_save_with_a_full_host_loses_blocks_quietly() -> None:
    kv = KVCacheManager(4, BS, num_host_blocks=1, enable_prefix_caching=False)
    v = make_request("v", range(13))
    k = keys(range(13))
    admit(kv, v)
    compute(kv, v)
    kv.free(v, preempted=True)  # 3 full blocks, 1 host block: only the first is saved
    v.num_computed_tokens = 0
    assert kv.stats.blocks_saved_on_preemption == 1
    assert [host(kv).lookup(key) for key in k] == [0, None, None]
    assert step(kv) == CacheOps(swap_out=[(0, 0)])
    assert admit(kv, v) == MatchResult([], [0])
    assert step(kv) == CacheOps(swap_in=[(0, 3)])  # device free list [3, 2, 1, 0]
    kv.free(v)
    assert_all_free(kv)


def test_blocks_read_from_the_pool_survive_other_admissions_until_their_own() -> None:
    """Two waiting requests read their prefixes in one step; the first one's admission evicts device
    blocks to the host tier, which must not evict the blocks just read for the second."""
    kv = KVCacheManager(8, BS, num_host_blocks=6, has_pool=True)
    w = make_request("w", range(1000, 1032))  # 8 blocks: fills the device, then stays cached there
    admit(kv, w, w.num_tokens)
    compute(kv, w)
    kv.free(w)
    step(kv)
    a, b = make_request("a", range(100, 116)), make_request("b", range(200, 216))
    loads = [kv.plan_pool_load(a), kv.plan_pool_load(b)]
    assert [load.host_block_ids for load in loads if load is not None] == [[0, 1, 2], [3, 4, 5]]
    for load in loads:
        assert load is not None
        kv.finish_pool_load(load, len(load.keys))
        kv.check_integrity()
    assert kv.match(b) == MatchResult([], [3, 4, 5], num_pool_blocks=3)
    assert admit(kv, a, a.num_tokens) == MatchResult(
        [], [0, 1, 2], num_pool_blocks=3
    )  # evicts device blocks to the host
    kv.check_integrity()
    assert kv.match(b) == MatchResult([], [3, 4, 5], num_pool_blocks=3)  # still there
    assert admit(kv, b, b.num_tokens) == MatchResult([], [3, 4, 5], num_pool_blocks=3)
    assert kv.stats.hit_tokens_pool == 2 * 3 * BS
    step(kv)
    for r in (a, b):
        compute(kv, r)
        kv.free(r)
    step(kv)
    assert_all_free(kv)


def test_a_pool_lookup_that_finds_nothing_evicts_nothing_from_the_host() -> None:
    kv = KVCacheManager(8, BS, num_host_blocks=3, has_pool=True)
    a = make_request("a", range(100, 109))  # 2 full blocks
    admit(kv, a, a.num_tokens)
    compute(kv, a)
    kv.free(a)  # write-through: a's 2 blocks go to host blocks 0, 1 (and the pool)
    step(kv)
    assert [host(kv).lookup(key) for key in keys(range(100, 108))] == [0, 1]
    cold = make_request("cold", range(500, 513))
    assert kv.pool_lookup_keys(cold) == keys(range(500, 512))
    assert kv.plan_pool_load(cold, num_in_pool=0) is None  # the pool has none of them
    assert [host(kv).lookup(key) for key in keys(range(100, 108))] == [0, 1]  # a's host copies are intact
    load = kv.plan_pool_load(cold, num_in_pool=1)  # the pool holds the first block only: one host block taken
    assert load == PoolLoad("cold", keys(range(500, 504)), [2])
    assert [host(kv).lookup(key) for key in keys(range(100, 108))] == [0, 1]
    kv.finish_pool_load(load, 1)
    kv.free(cold)
    kv.check_integrity()
    assert_all_free(kv)
