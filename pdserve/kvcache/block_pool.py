"""The blocks of one tier: free list, reference counts and the prefix index.

A block is in exactly one state:
- free: in the free list, unnamed, no references;
- cached: named by a key, no references, in the LRU (evictable and matchable);
- in use: one or more references (matchable too, if named).
Invariant (check_integrity): free + cached + in-use == total.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence


class BlockPool:
    """Block ids of one tier with their prefix index (key -> block).

    allocate() takes free blocks first (oldest freed first), then evicts cached
    blocks least recently used first and reports them, so the owner can save
    them to the next tier before their ids are reused.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached blocks, least recently used first
        self._key_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: free plus cached (evictable)."""
        return len(self._free) + len(self._lru)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._lru)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def allocate(self, num_blocks: int) -> tuple[list[int], list[tuple[int, bytes]]]:
        """Take `num_blocks` blocks (ref count 1, unnamed); returns them and the evicted (block, key) pairs.

        Raises RuntimeError (changing nothing) if fewer are free or cached.
        """
        if num_blocks > self.num_free_blocks:
            raise RuntimeError(f"asked for {num_blocks} blocks, only {self.num_free_blocks} free or cached")
        block_ids: list[int] = []
        evicted: list[tuple[int, bytes]] = []
        for _ in range(num_blocks):
            if self._free:
                block_id = self._free.popleft()
            else:
                block_id, _ = self._lru.popitem(last=False)
                key = self._key_of.pop(block_id)
                del self._block_of[key]
                evicted.append((block_id, key))
            self._ref_counts[block_id] = 1
            block_ids.append(block_id)
        return block_ids, evicted

    def ref(self, block_ids: Sequence[int]) -> None:
        """Take one more reference on each block (matched blocks); a cached block leaves the LRU."""
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                if block_id not in self._lru:
                    raise RuntimeError(f"block {block_id} is free; only named blocks can be shared")
                del self._lru[block_id]
            self._ref_counts[block_id] += 1

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference from each block, in order; at zero a named block becomes the most
        recently used cached block, an unnamed one goes to the back of the free list."""
        for block_id in block_ids:
            if self._ref_counts[block_id] <= 0:
                raise RuntimeError(f"block {block_id} freed twice")
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                if block_id in self._key_of:
                    self._lru[block_id] = None
                else:
                    self._free.append(block_id)

    def cache(self, block_id: int, key: bytes) -> bool:
        """Name an in-use block so it can be matched. False (nothing changes) if the key or the
        block is already named: the first block computed under a key keeps it."""
        if self._ref_counts[block_id] <= 0:
            raise RuntimeError(f"block {block_id} is not in use; only blocks in use can be named")
        if key in self._block_of or block_id in self._key_of:
            return False
        self._key_of[block_id] = key
        self._block_of[key] = block_id
        return True

    def uncache(self, block_id: int) -> None:
        """Forget the block's name; an unreferenced block becomes free."""
        key = self._key_of.pop(block_id, None)
        if key is None:
            return
        del self._block_of[key]
        if self._ref_counts[block_id] == 0:
            del self._lru[block_id]
            self._free.append(block_id)

    def lookup(self, key: bytes) -> int | None:
        return self._block_of.get(key)

    def key_of(self, block_id: int) -> bytes | None:
        return self._key_of.get(block_id)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def match(self, keys: Sequence[bytes]) -> list[int]:
        """Blocks of the longest leading run of `keys` found in this tier (changes nothing)."""
        block_ids = []
        for key in keys:
            block_id = self._block_of.get(key)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids

    def check_integrity(self) -> None:
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a block appears twice in the free list")
        in_use = {b for b, count in enumerate(self._ref_counts) if count > 0}
        cached = set(self._lru)
        if free & cached or free & in_use or cached & in_use:
            raise AssertionError("a block is in two states")
        if any(self._ref_counts[b] < 0 for b in range(self.num_blocks)):
            raise AssertionError("a negative reference count")
        if len(free) + len(cached) + len(in_use) != self.num_blocks:
            raise AssertionError(
                f"free {len(free)} + cached {len(cached)} + in-use {len(in_use)} != total {self.num_blocks}"
            )
        if any(b in self._key_of for b in free) or not cached <= set(self._key_of):
            raise AssertionError("a free block is named, or a cached block is not")
        if {self._block_of[k] for k in self._block_of} != set(self._key_of) or len(self._block_of) != len(self._key_of):
            raise AssertionError("the key -> block and block -> key maps disagree")
