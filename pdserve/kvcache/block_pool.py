"""A pool of fixed-size KV blocks on one tier, identified by integer ids."""

from __future__ import annotations

from collections import deque


class BlockPool:
    """Free list of block ids with reference counts.

    Invariant (check_integrity): free + in-use == total, and no id is both.
    Freed blocks go to the back of the free list, so the most recently freed
    block is reused last.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` free blocks (ref count 1). Raises if too few are free."""
        if num_blocks > len(self._free):
            raise RuntimeError(f"asked for {num_blocks} blocks, only {len(self._free)} free")
        block_ids = [self._free.popleft() for _ in range(num_blocks)]
        for block_id in block_ids:
            self._ref_counts[block_id] = 1
        return block_ids

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference from each block; blocks reaching zero return to the free list."""
        for block_id in block_ids:
            if self._ref_counts[block_id] <= 0:
                raise RuntimeError(f"block {block_id} freed twice")
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free.append(block_id)

    def check_integrity(self) -> None:
        in_use = sum(1 for count in self._ref_counts if count > 0)
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a block appears twice in the free list")
        if any(self._ref_counts[b] for b in free):
            raise AssertionError("a free block has references")
        if len(free) + in_use != self.num_blocks:
            raise AssertionError(f"free {len(free)} + in-use {in_use} != total {self.num_blocks}")
