"""BlockPool and KVCacheManager: exact block ids, all-or-nothing allocation, integrity."""

from __future__ import annotations

import pytest

from pdserve.kvcache import BlockPool, KVCacheManager
from pdserve.kvcache.manager import num_blocks_for

# ---- BlockPool ----------------------------------------------------------------


def test_pool_rejects_zero_blocks() -> None:
    with pytest.raises(ValueError, match="at least one block, got 0"):
        BlockPool(0)


def test_pool_allocates_ids_fifo_from_zero() -> None:
    pool = BlockPool(6)
    assert pool.num_free_blocks == 6
    assert pool.allocate(2) == [0, 1]
    pool.check_integrity()
    assert pool.allocate(3) == [2, 3, 4]
    pool.check_integrity()
    assert pool.num_free_blocks == 1
    assert pool.allocate(0) == []
    assert pool.num_free_blocks == 1


def test_pool_freed_blocks_go_to_the_back() -> None:
    pool = BlockPool(5)
    assert pool.allocate(3) == [0, 1, 2]
    pool.free([1, 0])
    pool.check_integrity()
    # free list is now [3, 4, 1, 0]: never-used blocks first, then in free order
    assert pool.allocate(1) == [3]
    pool.free([2])
    # free list: [4, 1, 0, 2]
    assert pool.allocate(4) == [4, 1, 0, 2]
    assert pool.num_free_blocks == 0
    pool.check_integrity()
    pool.free([3, 4, 1, 0, 2])
    assert pool.num_free_blocks == 5
    pool.check_integrity()
    assert pool.allocate(5) == [3, 4, 1, 0, 2]


def test_pool_over_allocation_raises_and_changes_nothing() -> None:
    pool = BlockPool(3)
    assert pool.allocate(2) == [0, 1]
    assert pool.can_allocate(1)
    assert not pool.can_allocate(2)
    with pytest.raises(RuntimeError, match="asked for 2 blocks, only 1 free"):
        pool.allocate(2)
    assert pool.num_free_blocks == 1
    pool.check_integrity()
    assert pool.allocate(1) == [2]


def test_pool_double_free_raises() -> None:
    pool = BlockPool(4)
    ids = pool.allocate(2)
    pool.free(ids)
    with pytest.raises(RuntimeError, match="block 0 freed twice"):
        pool.free([0])
    with pytest.raises(RuntimeError, match="block 3 freed twice"):
        pool.free([3])  # never allocated
    assert pool.num_free_blocks == 4
    pool.check_integrity()


def test_pool_check_integrity_catches_duplicate_in_free_list() -> None:
    pool = BlockPool(4)
    pool.allocate(1)
    pool._free.append(1)  # corrupt: block 1 listed twice
    with pytest.raises(AssertionError, match="twice in the free list"):
        pool.check_integrity()


def test_pool_check_integrity_catches_free_block_with_references() -> None:
    pool = BlockPool(4)
    pool._ref_counts[2] = 1  # corrupt: block 2 is free but referenced
    with pytest.raises(AssertionError, match="free block has references"):
        pool.check_integrity()


def test_pool_check_integrity_catches_lost_block() -> None:
    pool = BlockPool(4)
    pool.allocate(2)
    pool._ref_counts[0] = 0  # corrupt: block 0 is neither free nor in use
    with pytest.raises(AssertionError, match=r"free 2 \+ in-use 1 != total 4"):
        pool.check_integrity()


# ---- KVCacheManager -------------------------------------------------------------


def test_num_blocks_for() -> None:
    assert [num_blocks_for(n, 4) for n in (0, 1, 3, 4, 5, 8, 9)] == [0, 1, 1, 1, 2, 2, 3]


def test_manager_allocates_exact_ids_and_grows_tables() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    assert kv.num_blocks == 8
    assert kv.block_ids("a") == []
    assert kv.num_blocks_needed("a", 9) == 3
    assert kv.allocate_slots("a", 9)  # 3 blocks
    assert kv.block_ids("a") == [0, 1, 2]
    kv.check_integrity()
    assert kv.allocate_slots("b", 4)  # 1 block
    assert kv.block_ids("b") == [3]
    kv.check_integrity()
    # a grows from 9 to 12 tokens: still 3 blocks, nothing new
    assert kv.num_blocks_needed("a", 12) == 0
    assert kv.allocate_slots("a", 12)
    assert kv.block_ids("a") == [0, 1, 2]
    # a grows to 13 tokens: one more block, the next free id
    assert kv.num_blocks_needed("a", 13) == 1
    assert kv.allocate_slots("a", 13)
    assert kv.block_ids("a") == [0, 1, 2, 4]
    assert kv.num_free_blocks == 3
    kv.check_integrity()
    # asking for fewer tokens than held never shrinks
    assert kv.num_blocks_needed("a", 1) == 0
    assert kv.allocate_slots("a", 1)
    assert kv.block_ids("a") == [0, 1, 2, 4]
    kv.check_integrity()


def test_manager_allocation_is_all_or_nothing() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=2)
    assert kv.allocate_slots("a", 5)  # 3 blocks
    assert kv.block_ids("a") == [0, 1, 2]
    assert not kv.allocate_slots("b", 3)  # needs 2, 1 free
    assert kv.block_ids("b") == []
    assert kv.num_free_blocks == 1
    kv.check_integrity()
    assert not kv.allocate_slots("a", 9)  # needs 2 more, 1 free
    assert kv.block_ids("a") == [0, 1, 2]
    assert kv.num_free_blocks == 1
    kv.check_integrity()
    assert kv.allocate_slots("b", 2)
    assert kv.block_ids("b") == [3]
    assert kv.num_free_blocks == 0
    kv.check_integrity()


def test_manager_reserve_keeps_blocks_free() -> None:
    kv = KVCacheManager(num_blocks=6, block_size=4)
    assert kv.allocate_slots("a", 8, reserve=4)  # 2 + 4 == 6: allowed
    assert kv.block_ids("a") == [0, 1]
    assert not kv.allocate_slots("b", 4, reserve=4)  # 1 + 4 > 4
    assert kv.block_ids("b") == []
    assert kv.num_free_blocks == 4
    assert kv.allocate_slots("b", 4, reserve=3)  # 1 + 3 == 4
    assert kv.block_ids("b") == [2]
    # needing nothing new succeeds as long as the reserve is already free
    assert kv.allocate_slots("a", 8, reserve=3)
    assert not kv.allocate_slots("a", 8, reserve=4)
    assert kv.block_ids("a") == [0, 1]
    kv.check_integrity()


def test_manager_free_returns_everything_and_ids_go_to_back() -> None:
    kv = KVCacheManager(num_blocks=6, block_size=4)
    assert kv.allocate_slots("a", 8)
    assert kv.allocate_slots("b", 8)
    assert kv.allocate_slots("a", 12)
    assert kv.block_ids("a") == [0, 1, 4]
    assert kv.block_ids("b") == [2, 3]
    kv.free("a")
    kv.check_integrity()
    assert kv.block_ids("a") == []
    assert kv.num_free_blocks == 4
    # free list: [5, 0, 1, 4]
    assert kv.allocate_slots("c", 16)
    assert kv.block_ids("c") == [5, 0, 1, 4]
    kv.free("b")
    kv.free("c")
    assert kv.num_free_blocks == kv.num_blocks
    kv.check_integrity()
    # free list: [2, 3, 5, 0, 1, 4]
    assert kv.allocate_slots("d", 24)
    assert kv.block_ids("d") == [2, 3, 5, 0, 1, 4]
    kv.free("d")
    assert kv.num_free_blocks == 6
    kv.check_integrity()


def test_manager_free_unknown_or_twice_is_a_no_op() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=4)
    kv.free("nobody")
    assert kv.allocate_slots("a", 4)
    kv.free("a")
    kv.free("a")  # the table is gone, so the second free does nothing
    assert kv.num_free_blocks == 3
    kv.check_integrity()


def test_manager_double_free_of_shared_block_ids_raises() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=4)
    assert kv.allocate_slots("a", 4)
    kv.pool.free(kv.block_ids("a"))  # someone frees a's blocks behind the manager's back
    with pytest.raises(RuntimeError, match="block 0 freed twice"):
        kv.free("a")


def test_manager_check_integrity_catches_table_pool_mismatch() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4)
    assert kv.allocate_slots("a", 8)
    kv.check_integrity()
    kv._block_tables["a"].append(3)  # corrupt: a claims a block the pool thinks is free
    with pytest.raises(AssertionError, match="tables hold 3 blocks, pool has 2 in use"):
        kv.check_integrity()


def test_manager_zero_tokens_allocates_nothing() -> None:
    kv = KVCacheManager(num_blocks=2, block_size=4)
    assert kv.allocate_slots("a", 0)
    assert kv.block_ids("a") == []
    assert kv.num_free_blocks == 2
    kv.check_integrity()
