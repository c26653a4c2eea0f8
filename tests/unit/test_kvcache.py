"""BlockPool and KVCacheManager: exact block ids, eviction order, all-or-nothing allocation, integrity."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from pdserve.kvcache import BlockPool, KVCacheManager
from pdserve.kvcache.manager import num_blocks_for
from pdserve.request import Request, SamplingParams

K = [f"key-{i}".encode() for i in range(8)]


class CheckedPool(BlockPool):
    """A BlockPool that checks its invariant after every operation, also after one that raised."""

    def allocate(self, num_blocks: int) -> tuple[list[int], list[tuple[int, bytes]]]:
        try:
            return super().allocate(num_blocks)
        finally:
            self.check_integrity()

    def ref(self, block_ids: Sequence[int]) -> None:
        try:
            super().ref(block_ids)
        finally:
            self.check_integrity()

    def free(self, block_ids: Sequence[int]) -> None:
        try:
            super().free(block_ids)
        finally:
            self.check_integrity()

    def cache(self, block_id: int, key: bytes) -> bool:
        try:
            return super().cache(block_id, key)
        finally:
            self.check_integrity()

    def uncache(self, block_id: int) -> None:
        try:
            super().uncache(block_id)
        finally:
            self.check_integrity()


def named(pool: BlockPool, num_blocks: int) -> list[int]:
    """Allocate `num_blocks` blocks and name block i of them K[i]."""
    block_ids, evicted = pool.allocate(num_blocks)
    assert evicted == []
    for i, block_id in enumerate(block_ids):
        assert pool.cache(block_id, K[i])
    return block_ids


# ---- BlockPool: free list ----------------------------------------------------------


def test_pool_rejects_zero_blocks() -> None:
    with pytest.raises(ValueError, match="at least one block, got 0"):
        BlockPool(0)


def test_pool_allocates_ids_fifo_from_zero() -> None:
    pool = CheckedPool(6)
    assert (pool.num_blocks, pool.num_free_blocks, pool.num_cached_blocks) == (6, 6, 0)
    assert pool.allocate(2) == ([0, 1], [])
    assert pool.allocate(3) == ([2, 3, 4], [])
    assert pool.num_free_blocks == 1
    assert pool.allocate(0) == ([], [])
    assert pool.num_free_blocks == 1
    assert [pool.ref_count(b) for b in range(6)] == [1, 1, 1, 1, 1, 0]


def test_pool_freed_blocks_go_to_the_back_in_free_order() -> None:
    pool = CheckedPool(5)
    assert pool.allocate(3) == ([0, 1, 2], [])
    pool.free([1, 0])
    # free list is now [3, 4, 1, 0]: never-used blocks first, then in free order
    assert pool.allocate(1) == ([3], [])
    pool.free([2])
    # free list: [4, 1, 0, 2]
    assert pool.allocate(4) == ([4, 1, 0, 2], [])
    assert pool.num_free_blocks == 0
    pool.free([3, 4, 1, 0, 2])
    assert pool.num_free_blocks == 5
    assert pool.allocate(5) == ([3, 4, 1, 0, 2], [])


def test_pool_over_allocation_raises_and_changes_nothing() -> None:
    pool = CheckedPool(4)
    assert named(pool, 2) == [0, 1]
    pool.free([0])  # 0 is cached: counted as free (evictable)
    assert pool.allocate(1) == ([2], [])
    assert (pool.num_free_blocks, pool.num_cached_blocks) == (2, 1)
    assert pool.can_allocate(2)
    assert not pool.can_allocate(3)
    with pytest.raises(RuntimeError, match="asked for 3 blocks, only 2 free or cached"):
        pool.allocate(3)
    assert (pool.num_free_blocks, pool.num_cached_blocks) == (2, 1)
    assert pool.lookup(K[0]) == 0
    assert pool.allocate(2) == ([3, 0], [(0, K[0])])  # the free block first, then the cached one


def test_pool_double_free_raises() -> None:
    pool = CheckedPool(4)
    block_ids, _ = pool.allocate(2)
    pool.free(block_ids)
    with pytest.raises(RuntimeError, match="block 0 freed twice"):
        pool.free([0])
    with pytest.raises(RuntimeError, match="block 3 freed twice"):
        pool.free([3])  # never allocated
    assert named(pool, 1) == [2]
    pool.free([2])  # cached now, not free: freeing it again is still a double free
    with pytest.raises(RuntimeError, match="block 2 freed twice"):
        pool.free([2])
    assert (pool.num_free_blocks, pool.num_cached_blocks) == (4, 1)


# ---- BlockPool: naming, sharing, eviction -------------------------------------------


def test_pool_freed_named_block_becomes_the_most_recently_used_cached_block() -> None:
    pool = CheckedPool(4)
    assert named(pool, 3) == [0, 1, 2]
    pool.free([2, 0, 1])  # LRU, oldest first: [2, 0, 1]; free list [3]
    assert (pool.num_free_blocks, pool.num_cached_blocks) == (4, 3)
    assert [pool.ref_count(b) for b in range(4)] == [0, 0, 0, 0]
    assert [pool.lookup(k) for k in K[:3]] == [0, 1, 2]
    # free blocks first, then the least recently used cached block, reported with its key
    assert pool.allocate(2) == ([3, 2], [(2, K[2])])
    assert pool.lookup(K[2]) is None and pool.key_of(2) is None
    assert pool.allocate(2) == ([0, 1], [(0, K[0]), (1, K[1])])
    assert (pool.num_free_blocks, pool.num_cached_blocks) == (0, 0)
    assert [pool.lookup(k) for k in K[:3]] == [None, None, None]
    pool.free([0, 1, 2, 3])  # unnamed now: back to the free list
    assert (pool.num_free_blocks, pool.num_cached_blocks) == (4, 0)
    assert pool.allocate(4) == ([0, 1, 2, 3], [])


def test_pool_ref_of_a_cached_block_takes_it_out_of_the_lru() -> None:
    pool = CheckedPool(3)
    assert named(pool, 3) == [0, 1, 2]
    pool.free([0, 1, 2])  # LRU [0, 1, 2]
    pool.ref([0])
    assert pool.ref_count(0) == 1
    assert (pool.num_free_blocks, pool.num_cached_blocks) == (2, 2)
    assert pool.allocate(1) == ([1], [(1, K[1])])  # 0 is in use: skipped
    pool.ref([0])  # a second sharer
    assert pool.ref_count(0) == 2
    pool.free([0])
    assert pool.num_cached_blocks == 1  # still in use once
    pool.free([0])  # LRU [2, 0]: 0 is now the most recent
    assert pool.lookup(K[0]) == 0
    pool.free([1])  # unnamed since its eviction: free list [1]
    assert pool.allocate(3) == ([1, 2, 0], [(2, K[2]), (0, K[0])])


def test_pool_ref_of_a_free_block_raises() -> None:
    pool = CheckedPool(3)
    with pytest.raises(RuntimeError, match="block 0 is free; only named blocks can be shared"):
        pool.ref([0])
    assert pool.ref_count(0) == 0 and pool.num_free_blocks == 3
    assert pool.allocate(1) == ([0], [])
    pool.ref([0])  # an unnamed block in use may take another reference
    assert pool.ref_count(0) == 2
    pool.free([0, 0])
    with pytest.raises(RuntimeError, match="block 0 is free"):
        pool.ref([0])
    assert pool.allocate(3) == ([1, 2, 0], [])


def test_pool_cache_of_a_used_key_or_named_block_returns_false_and_changes_nothing() -> None:
    pool = CheckedPool(4)
    assert pool.allocate(2) == ([0, 1], [])
    assert pool.cache(0, K[0])
    assert not pool.cache(1, K[0])  # the first block computed under a key keeps it
    assert pool.key_of(1) is None and pool.lookup(K[0]) == 0
    assert not pool.cache(0, K[1])  # a named block keeps its name
    assert pool.key_of(0) == K[0] and pool.lookup(K[1]) is None
    with pytest.raises(RuntimeError, match="block 3 is not in use; only blocks in use can be named"):
        pool.cache(3, K[3])
    assert pool.lookup(K[3]) is None
    pool.free([0, 1])  # 0 cached, 1 free: free list [2, 3, 1]
    assert (pool.num_free_blocks, pool.num_cached_blocks) == (4, 1)
    with pytest.raises(RuntimeError, match="block 0 is not in use"):
        pool.cache(0, K[5])  # a cached block cannot be renamed either
    assert pool.allocate(3) == ([2, 3, 1], [])
    assert pool.allocate(1) == ([0], [(0, K[0])])


def test_pool_uncache() -> None:
    pool = CheckedPool(4)
    assert named(pool, 2) == [0, 1]
    pool.uncache(0)  # in use: forgets the name only
    assert (pool.lookup(K[0]), pool.key_of(0), pool.ref_count(0)) == (None, None, 1)
    pool.free([0, 1])  # 0 unnamed -> free list [2, 3, 0]; 1 cached
    assert (pool.num_free_blocks, pool.num_cached_blocks) == (4, 1)
    pool.uncache(1)  # cached: becomes free, at the back
    assert (pool.num_free_blocks, pool.num_cached_blocks) == (4, 0)
    assert pool.lookup(K[1]) is None
    pool.uncache(1)  # unnamed: nothing to do
    pool.uncache(3)
    assert pool.allocate(4) == ([2, 3, 0, 1], [])


def test_pool_match_is_the_leading_run_and_changes_nothing() -> None:
    pool = CheckedPool(5)
    assert pool.allocate(4) == ([0, 1, 2, 3], [])
    for block_id, key in ((2, K[0]), (0, K[1]), (3, K[3])):  # K[2] is not named
        assert pool.cache(block_id, key)
    assert pool.match([K[0], K[1], K[2], K[3]]) == [2, 0]
    assert pool.match([K[0], K[1]]) == [2, 0]
    assert pool.match([K[3]]) == [3]
    assert pool.match([K[2], K[0]]) == []
    assert pool.match([]) == []
    pool.free([3, 0, 2, 1])  # LRU [3, 0, 2]; free list [4, 1]
    assert pool.match([K[0], K[1], K[2]]) == [2, 0]  # cached blocks match too; the LRU is untouched
    assert pool.allocate(5) == ([4, 1, 3, 0, 2], [(3, K[3]), (0, K[1]), (2, K[0])])


def test_pool_eviction_reports_every_pair_in_order_across_a_long_run() -> None:
    pool = CheckedPool(6)
    assert named(pool, 6) == [0, 1, 2, 3, 4, 5]
    pool.free([5, 4, 3, 2, 1, 0])  # a request's table, tail first: its first block is evicted last
    block_ids, evicted = pool.allocate(4)
    assert block_ids == [5, 4, 3, 2]
    assert evicted == [(5, K[5]), (4, K[4]), (3, K[3]), (2, K[2])]
    assert pool.match(K[:6]) == [0, 1]
    pool.free([2, 3])  # unnamed: free list [2, 3]
    assert pool.allocate(3) == ([2, 3, 1], [(1, K[1])])


# ---- BlockPool: check_integrity catches corruption -----------------------------------


def test_pool_check_integrity_catches_duplicate_in_free_list() -> None:
    pool = BlockPool(4)
    pool.allocate(1)
    pool._free.append(1)  # corrupt: block 1 listed twice
    with pytest.raises(AssertionError, match="twice in the free list"):
        pool.check_integrity()


def test_pool_check_integrity_catches_free_block_with_references() -> None:
    pool = BlockPool(4)
    pool._ref_counts[2] = 1  # corrupt: block 2 is free but referenced
    with pytest.raises(AssertionError, match="a block is in two states"):
        pool.check_integrity()


def test_pool_check_integrity_catches_cached_block_in_use() -> None:
    pool = BlockPool(4)
    named(pool, 1)
    pool.free([0])
    pool._ref_counts[0] = 1  # corrupt: block 0 is in the LRU and referenced
    with pytest.raises(AssertionError, match="a block is in two states"):
        pool.check_integrity()


def test_pool_check_integrity_catches_lost_block() -> None:
    pool = BlockPool(4)
    pool.allocate(2)
    pool._ref_counts[0] = 0  # corrupt: block 0 is neither free, cached nor in use
    with pytest.raises(AssertionError, match=r"free 2 \+ cached 0 \+ in-use 1 != total 4"):
        pool.check_integrity()


def test_pool_check_integrity_catches_negative_reference_count() -> None:
    pool = BlockPool(4)
    pool._ref_counts[3] = -1
    with pytest.raises(AssertionError, match="a negative reference count"):
        pool.check_integrity()


def test_pool_check_integrity_catches_unnamed_cached_block() -> None:
    pool = BlockPool(4)
    named(pool, 1)
    pool.free([0])
    del pool._block_of[K[0]]
    del pool._key_of[0]  # corrupt: block 0 stays in the LRU without a name
    with pytest.raises(AssertionError, match="a free block is named, or a cached block is not"):
        pool.check_integrity()


def test_pool_check_integrity_catches_named_free_block() -> None:
    pool = BlockPool(4)
    pool._key_of[1] = K[1]
    pool._block_of[K[1]] = 1  # corrupt: block 1 is in the free list with a name
    with pytest.raises(AssertionError, match="a free block is named, or a cached block is not"):
        pool.check_integrity()


def test_pool_check_integrity_catches_key_maps_that_disagree() -> None:
    pool = BlockPool(4)
    named(pool, 2)
    pool._block_of[K[0]] = 1  # corrupt: K[0] -> 1, but 1 is named K[1]
    with pytest.raises(AssertionError, match="maps disagree"):
        pool.check_integrity()


# ---- KVCacheManager: a device tier, no prefix reuse -----------------------------------


def make_request(req_id: str, num_tokens: int, first_token: int = 0) -> Request:
    return Request(
        req_id, tuple(range(first_token, first_token + num_tokens)), SamplingParams(max_tokens=4, temperature=0)
    )


def test_num_blocks_for() -> None:
    assert [num_blocks_for(n, 4) for n in (0, 1, 3, 4, 5, 8, 9)] == [0, 1, 1, 1, 2, 2, 3]


def test_manager_allocates_exact_ids_and_grows_tables() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a, b = make_request("a", 13), make_request("b", 4, first_token=100)
    assert kv.num_blocks == 8
    assert kv.block_ids("a") == []
    assert kv.num_blocks_needed("a", 9) == 3
    assert kv.allocate_slots(a, 9)  # 3 blocks
    assert kv.block_ids("a") == [0, 1, 2]
    kv.check_integrity()
    assert kv.allocate_slots(b, 4)  # 1 block
    assert kv.block_ids("b") == [3]
    kv.check_integrity()
    # a grows from 9 to 12 tokens: still 3 blocks, nothing new
    assert kv.num_blocks_needed("a", 12) == 0
    assert kv.allocate_slots(a, 12)
    assert kv.block_ids("a") == [0, 1, 2]
    # a grows to 13 tokens: one more block, the next free id
    assert kv.num_blocks_needed("a", 13) == 1
    assert kv.allocate_slots(a, 13)
    assert kv.block_ids("a") == [0, 1, 2, 4]
    assert kv.num_free_blocks == 3
    kv.check_integrity()
    # asking for fewer tokens than held never shrinks
    assert kv.num_blocks_needed("a", 1) == 0
    assert kv.allocate_slots(a, 1)
    assert kv.block_ids("a") == [0, 1, 2, 4]
    kv.check_integrity()
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 8
    kv.check_integrity()


def test_manager_allocation_is_all_or_nothing() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a, b = make_request("a", 9), make_request("b", 3, first_token=50)
    assert kv.allocate_slots(a, 5)  # 3 blocks
    assert kv.block_ids("a") == [0, 1, 2]
    assert not kv.allocate_slots(b, 3)  # needs 2, 1 free
    assert kv.block_ids("b") == []
    assert kv.num_free_blocks == 1
    kv.check_integrity()
    assert not kv.allocate_slots(a, 9)  # needs 2 more, 1 free
    assert kv.block_ids("a") == [0, 1, 2]
    assert kv.num_free_blocks == 1
    kv.check_integrity()
    assert kv.allocate_slots(b, 2)
    assert kv.block_ids("b") == [3]
    assert kv.num_free_blocks == 0
    kv.check_integrity()


def test_manager_reserve_keeps_blocks_free() -> None:
    kv = KVCacheManager(num_blocks=6, block_size=4)
    a, b = make_request("a", 8), make_request("b", 4, first_token=50)
    assert kv.allocate_slots(a, 8, reserve=4)  # 2 + 4 == 6: allowed
    assert kv.block_ids("a") == [0, 1]
    assert not kv.allocate_slots(b, 4, reserve=4)  # 1 + 4 > 4
    assert kv.block_ids("b") == []
    assert kv.num_free_blocks == 4
    assert kv.allocate_slots(b, 4, reserve=3)  # 1 + 3 == 4
    assert kv.block_ids("b") == [2]
    # needing nothing new succeeds as long as the reserve is already free
    assert kv.allocate_slots(a, 8, reserve=3)
    assert not kv.allocate_slots(a, 8, reserve=4)
    assert kv.block_ids("a") == [0, 1]
    kv.check_integrity()


def test_manager_free_returns_everything_tail_first() -> None:
    kv = KVCacheManager(num_blocks=6, block_size=4)
    a, b = make_request("a", 12), make_request("b", 8, first_token=100)
    c, d = make_request("c", 16, first_token=200), make_request("d", 24, first_token=300)
    assert kv.allocate_slots(a, 8)
    assert kv.allocate_slots(b, 8)
    assert kv.allocate_slots(a, 12)
    assert kv.block_ids("a") == [0, 1, 4]
    assert kv.block_ids("b") == [2, 3]
    kv.free(a)  # nothing computed, nothing named: all to the free list, tail first
    kv.check_integrity()
    assert kv.block_ids("a") == []
    assert kv.num_free_blocks == 4
    # free list: [5, 4, 1, 0]
    assert kv.allocate_slots(c, 16)
    assert kv.block_ids("c") == [5, 4, 1, 0]
    kv.free(b)
    kv.free(c)
    assert kv.num_free_blocks == kv.num_blocks
    kv.check_integrity()
    # free list: [3, 2, 0, 1, 4, 5]
    assert kv.allocate_slots(d, 24)
    assert kv.block_ids("d") == [3, 2, 0, 1, 4, 5]
    kv.free(d)
    assert kv.num_free_blocks == 6
    kv.check_integrity()


def test_manager_free_unknown_or_twice_is_a_no_op() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=4)
    a = make_request("a", 4)
    kv.free(make_request("nobody", 4))
    assert kv.allocate_slots(a, 4)
    kv.free(a)
    kv.free(a)  # the table is gone, so the second free does nothing
    assert kv.num_free_blocks == 3
    kv.check_integrity()


def test_manager_double_free_of_block_ids_raises() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=4)
    a = make_request("a", 4)
    assert kv.allocate_slots(a, 4)
    kv.device.free(kv.block_ids("a"))  # someone frees a's blocks behind the manager's back
    with pytest.raises(RuntimeError, match="block 0 freed twice"):
        kv.free(a)


def test_manager_check_integrity_catches_table_pool_mismatch() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a = make_request("a", 8)
    assert kv.allocate_slots(a, 8)
    kv.check_integrity()
    kv._tables["a"].append(3)  # corrupt: a claims a block the pool thinks is free
    with pytest.raises(AssertionError, match="device block 3: 0 references, 1 tables and holds have it"):
        kv.check_integrity()


def test_manager_zero_tokens_allocates_nothing() -> None:
    kv = KVCacheManager(num_blocks=2, block_size=4)
    a = make_request("a", 4)
    assert kv.allocate_slots(a, 0)
    assert kv.block_ids("a") == []
    assert kv.num_free_blocks == 2
    kv.check_integrity()
    kv.free(a)
    kv.check_integrity()
