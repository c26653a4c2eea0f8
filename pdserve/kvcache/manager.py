"""Which blocks each request holds on the device tier."""

from __future__ import annotations

from pdserve.kvcache.block_pool import BlockPool


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class KVCacheManager:
    """Maps request ids to block tables; allocation is all-or-nothing.

    A request's block table only grows while it runs; `free` returns all of it.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self._block_tables: dict[str, list[int]] = {}

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def block_ids(self, req_id: str) -> list[int]:
        return self._block_tables.get(req_id, [])

    def num_blocks_needed(self, req_id: str, num_tokens: int) -> int:
        """New blocks `req_id` needs so that it can hold `num_tokens` tokens."""
        held = len(self._block_tables.get(req_id, ()))
        return max(0, num_blocks_for(num_tokens, self.block_size) - held)

    def allocate_slots(self, req_id: str, num_tokens: int, reserve: int = 0) -> bool:
        """Grow `req_id`'s table to hold `num_tokens` tokens.

        Returns False and changes nothing if that would leave fewer than
        `reserve` blocks free.
        """
        needed = self.num_blocks_needed(req_id, num_tokens)
        if needed + reserve > self.pool.num_free_blocks:
            return False
        if needed:
            self._block_tables.setdefault(req_id, []).extend(self.pool.allocate(needed))
        return True

    def free(self, req_id: str) -> None:
        block_ids = self._block_tables.pop(req_id, None)
        if block_ids:
            self.pool.free(block_ids)

    def check_integrity(self) -> None:
        self.pool.check_integrity()
        held = sum(len(t) for t in self._block_tables.values())
        if held != self.pool.num_blocks - self.pool.num_free_blocks:
            raise AssertionError(f"tables hold {held} blocks, pool has {self.pool.num_blocks - self.pool.num_free_blocks} in use")
