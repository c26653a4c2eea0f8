"""Which device blocks each request holds, and the prefix index over them.

The device tier holds the blocks requests compute into; named (fully computed)
blocks stay cached for reuse after their request ends, matched by chained
keys (kvcache.keys). The optional host tier and pool (kvcache.tiers) hold
blocks evicted from the device, saved on preemption, or read from the pool;
the manager decides every move between the tiers and records it there as a
CacheOps entry for the workers. It never touches tensors, and knows nothing
about PD (disagg.storage stages prompts through `tiers`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec

from pdserve.kvcache.block_pool import BlockPool
from pdserve.kvcache.keys import chain_keys
from pdserve.kvcache.tiers import HostTiers, PoolLoad
from pdserve.messages import CacheOps
from pdserve.request import Request

__all__ = ["CacheStats", "KVCacheManager", "MatchResult", "PoolLoad", "num_blocks_for"]


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


@dataclass(frozen=True)
class MatchResult:
    """A request's cached prefix: device blocks to share, then host blocks to swap in."""

    device_block_ids: list[int] = field(default_factory=list)
    host_block_ids: list[int] = field(default_factory=list)
    num_pool_blocks: int = 0  # how many of the host blocks were just read from the pool

    @property
    def num_blocks(self) -> int:
        return len(self.device_block_ids) + len(self.host_block_ids)


@dataclass
class CacheStats:
    query_tokens: int = 0
    hit_tokens_device: int = 0
    hit_tokens_host: int = 0
    hit_tokens_pool: int = 0
    blocks_saved_on_preemption: int = 0


class KVCacheManager:
    """Block tables per request over a device tier, an optional host tier and an optional pool.

    Allocation is all-or-nothing; a request's block table only grows while it
    runs; `free` returns all of it (named blocks stay cached for reuse).
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        root: bytes = b"pdserve",
        num_host_blocks: int = 0,
        has_pool: bool = False,
        enable_prefix_caching: bool = True,
        preempt_save: bool = True,
        cache_output: bool = False,
    ) -> None:
        self.tiers = HostTiers(num_host_blocks, has_pool)
        self.block_size = block_size
        self.root = root
        self.device = BlockPool(num_blocks)
        self.host = self.tiers.host
        self.has_pool = has_pool
        self.enable_prefix_caching = enable_prefix_caching
        self.preempt_save = preempt_save and self.host is not None
        self.cache_output = cache_output
        self.stats = CacheStats()
        self._tables: dict[str, list[int]] = {}
        self._holds: dict[str, list[int]] = {}  # holder -> device blocks it references (see hold())
        self._num_named: dict[str, int] = {}  # leading blocks of a table already offered to the index
        self._saved: set[str] = set()  # preempted requests whose blocks were saved
        self._device_copies: list[tuple[int, int]] = []  # forks' copy-on-write, for the next plan

    # ---- sizes ---------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.device.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Device blocks an allocation can take (free or cached)."""
        return self.device.num_free_blocks

    @property
    def num_host_blocks(self) -> int:
        return self.tiers.num_host_blocks

    def block_ids(self, req_id: str) -> list[int]:
        return self._tables.get(req_id, [])

    def num_blocks_needed(self, req_id: str, num_tokens: int) -> int:
        """New blocks `req_id` needs so that it can hold `num_tokens` tokens."""
        held = len(self._tables.get(req_id, ()))
        return max(0, num_blocks_for(num_tokens, self.block_size) - held)

    # ---- matching ------------------------------------------------------------------

    def keys_for(self, request: Request) -> list[bytes]:
        """Chained keys of every full block of the request's tokens (cached on the request)."""
        bs = self.block_size
        keys = request.block_keys
        num_full = request.num_tokens // bs
        if len(keys) < num_full:
            tail = request.token_ids_slice(len(keys) * bs, num_full * bs)
            keys.extend(chain_keys(keys[-1] if keys else self.root, tail, bs))
        return keys

    def _can_match(self, request: Request) -> bool:
        if request.req_id in self._saved:
            return True  # its own blocks, saved on preemption: their prompt logprobs, if any, were scored before
        # a request that scores its prompt needs every prompt position's logits: it computes the whole prompt
        return self.enable_prefix_caching and request.sampling.prompt_logprobs is None

    def _matchable_keys(self, request: Request) -> list[bytes]:
        # A full hit still recomputes the last token (for its logits): never match the block holding it.
        max_blocks = (request.num_tokens - 1) // self.block_size
        return self.keys_for(request)[:max_blocks]

    def match(self, request: Request) -> MatchResult:
        """The request's longest cached prefix on device, then host (changes nothing)."""
        if not self._can_match(request):
            return MatchResult()
        keys = self._matchable_keys(request)
        device_ids = self.device.match(keys) if self.enable_prefix_caching else []
        host_ids = self.tiers.match(keys[len(device_ids) :])
        host_keys = keys[len(device_ids) : len(device_ids) + len(host_ids)]
        return MatchResult(device_ids, host_ids, self.tiers.num_loaded(request.req_id, host_keys))

    def pool_lookup_keys(self, request: Request) -> list[bytes]:
        """The keys worth looking up in the pool for `request`: those after its device and host hits."""
        return self._pool_candidates(request)[1]

    def _pool_candidates(self, request: Request) -> tuple[MatchResult, list[bytes]]:
        if not self.has_pool or self.host is None or not self._can_match(request):
            return MatchResult(), []
        match = self.match(request)
        return match, self._matchable_keys(request)[match.num_blocks :]

    def plan_pool_load(self, request: Request, num_in_pool: int | None = None) -> PoolLoad | None:
        """Host blocks to read the request's next cached blocks into from the pool, or None.

        num_in_pool: how many of pool_lookup_keys the pool holds (None: try them all); only that
        many host blocks are taken, so a lookup that finds nothing evicts nothing. The target
        blocks are held (not matchable, not evictable) until finish_pool_load.
        """
        match, keys = self._pool_candidates(request)
        if num_in_pool is not None:
            keys = keys[:num_in_pool]
        return self.tiers.plan_pool_load(request.req_id, match.host_block_ids, keys)

    def finish_pool_load(self, load: PoolLoad, num_loaded: int) -> None:
        """Name the first `num_loaded` blocks (read completely on every rank); free the rest."""
        self.tiers.finish_pool_load(load, num_loaded)

    # ---- allocation ----------------------------------------------------------------

    def allocate_slots(
        self, request: Request, num_tokens: int, reserve: int = 0, match: MatchResult | None = None
    ) -> bool:
        """Grow the request's table to hold `num_tokens` tokens; on admission pass its `match`
        (maybe empty), which is taken first and counted in the hit statistics.

        Returns False and changes nothing if that would leave fewer than
        `reserve` device blocks free. Matched blocks are taken before anything
        is evicted, so an allocation never evicts the prefix it is about to reuse.
        """
        req_id = request.req_id
        is_admission = match is not None
        match = match or MatchResult()
        if is_admission and req_id in self._tables:
            raise RuntimeError(f"request {req_id} already holds blocks; a match applies only at admission")
        held = len(self._tables.get(req_id, ())) + len(match.device_block_ids)
        needed = max(0, num_blocks_for(num_tokens, self.block_size) - held)
        # matched blocks that are cached now stop being allocatable once taken: count them before taking anything
        num_matched_cached = sum(1 for b in match.device_block_ids if self.device.ref_count(b) == 0)
        if needed + reserve > self.device.num_free_blocks - num_matched_cached or needed < len(match.host_block_ids):
            return False
        self.device.ref(match.device_block_ids)
        if self.host is not None:
            self.host.ref(match.host_block_ids)
        new_ids, evicted = self.device.allocate(needed)
        self._save(evicted, to_host=self.enable_prefix_caching)
        table = self._tables.setdefault(req_id, [])
        if match.num_blocks:
            table.extend(match.device_block_ids)
            keys = self._matchable_keys(request)
            for host_id, device_id in zip(match.host_block_ids, new_ids):
                self.tiers.swap_in(host_id, device_id)
                if self.enable_prefix_caching:
                    self.device.cache(device_id, keys[len(table)])
                table.append(device_id)
            new_ids = new_ids[len(match.host_block_ids) :]
            self._num_named[req_id] = len(table)
        if is_admission:
            self._count_hits(request, match)
            self.tiers.forget(req_id)  # the matched ones are referenced by the swap-ins now
        table.extend(new_ids)
        return True

    def _count_hits(self, request: Request, match: MatchResult) -> None:
        bs = self.block_size
        if self._can_match(request):  # with prefix caching off, only a preempted request looks up (its own blocks)
            self.stats.query_tokens += request.num_tokens
        self.stats.hit_tokens_device += len(match.device_block_ids) * bs
        self.stats.hit_tokens_pool += match.num_pool_blocks * bs
        self.stats.hit_tokens_host += (len(match.host_block_ids) - match.num_pool_blocks) * bs

    def cache_computed(self, request: Request) -> None:
        """Name the request's blocks that are now fully computed, so later requests can match them."""
        if not self.enable_prefix_caching:
            return
        table = self._tables.get(request.req_id)
        if not table:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(table))
        start = self._num_named.get(request.req_id, 0)
        if num_full <= start:
            return
        keys = self.keys_for(request)
        for i in range(start, num_full):
            self.device.cache(table[i], keys[i])
        self._num_named[request.req_id] = num_full

    def fork(self, leader: Request, sibling: Request, reserve: int = 0) -> int:
        """Give `sibling` (another choice of the leader's prompt, not admitted yet) the leader's computed prompt:
        the blocks before the one holding the last prompt token shared, that block copied (copy-on-write: each
        writes its own completion after the prompt in it). Returns how many prompt tokens the sibling has
        computed now (all but the last, whose logits it needs), or 0 (nothing changed: the leader's prompt is
        not computed, or no block is free beyond `reserve`)."""
        bs = self.block_size
        n = sibling.num_prompt_tokens
        if n < 2:
            return 0  # a one-token prompt has nothing computed to share
        table = self._tables.get(leader.req_id)
        last = (n - 1) // bs  # the block holding the last prompt token
        if sibling.req_id in self._tables:
            raise RuntimeError(f"request {sibling.req_id} already holds blocks; only a new request is forked")
        if (
            not table
            or len(table) <= last
            or leader.num_computed_tokens < n
            or leader.prompt_token_ids != sibling.prompt_token_ids
        ):
            return 0
        if 1 + reserve > self.device.num_free_blocks:
            return 0
        shared = table[:last]
        self.device.ref(shared)
        new_ids, evicted = self.device.allocate(1)
        self._save(evicted, to_host=self.enable_prefix_caching)  # (its swap_out runs before the copy)
        self._device_copies.append((table[last], new_ids[0]))
        self._tables[sibling.req_id] = [*shared, *new_ids]
        self._num_named[sibling.req_id] = min(self._num_named.get(leader.req_id, 0), len(shared))
        return n - 1

    # ---- holds: blocks kept past their request (e.g. while P sends them to D) ---------

    def hold(self, holder: str, req_id: str) -> list[int]:
        """Take one more reference on `req_id`'s current blocks under `holder`; they stay allocated (and out
        of the LRU) after the request is freed, until release(holder). Returns the held block ids."""
        blocks = list(self._tables.get(req_id, ()))
        if holder in self._holds:
            raise ValueError(f"{holder!r} already holds blocks")
        self.device.ref(blocks)
        self._holds[holder] = blocks
        return blocks

    def release(self, holder: str) -> None:
        """Drop `holder`'s references; unknown holders are ignored."""
        blocks = self._holds.pop(holder, None)
        if blocks:
            self.device.free(blocks[::-1])

    # ---- freeing and saving --------------------------------------------------------

    def free(self, request: Request, *, preempted: bool = False) -> None:
        """Return the request's blocks. Named blocks stay cached on the device.

        preempted: save its computed full blocks to the host tier (and pool) first,
        or with preempt_save off drop them so they are recomputed. finished (not
        preempted): write its full blocks through to the pool, if there is one.
        """
        req_id = request.req_id
        table = self._tables.pop(req_id, None)
        self._num_named.pop(req_id, None)
        self._saved.discard(req_id)
        self.tiers.forget(req_id)
        if not table:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(table))
        if preempted and self.preempt_save:
            keys = self.keys_for(request)
            saved = self._save(list(zip(table[:num_full], keys[:num_full])), to_host=True)
            self.stats.blocks_saved_on_preemption += saved
            self._saved.add(req_id)
        elif preempted:
            for block_id in table:
                if self.device.ref_count(block_id) == 1:
                    self.device.uncache(block_id)
        elif self.has_pool and self.enable_prefix_caching:
            if not self.cache_output:
                num_full = min(num_full, request.num_prompt_tokens // self.block_size)
            keys = self.keys_for(request)
            todo = [(b, k) for b, k in zip(table[:num_full], keys[:num_full]) if not self.tiers.is_in_pool(k)]
            self._save(todo, to_host=True)
        self.device.free(table[::-1])  # the tail is evicted first, the shared prefix last

    def _save(self, blocks: Sequence[tuple[int, bytes]], *, to_host: bool) -> int:
        """Copy device blocks (block, key) to the host tier and write them through to the pool (kvcache.tiers);
        returns how many are now on the host."""
        return self.tiers.save(blocks) if to_host else 0

    # ---- steps -----------------------------------------------------------------------

    @property
    def has_pending_ops(self) -> bool:
        return self.tiers.has_pending_ops or bool(self._device_copies)

    def take_ops(self) -> CacheOps:
        """The ops recorded since the last plan; their host blocks stay held until end_step."""
        ops = self.tiers.take_ops()
        if self._device_copies:
            ops = msgspec.structs.replace(ops, device_copy=self._device_copies)
            self._device_copies = []
        return ops

    def end_step(self) -> None:
        """The plan carrying the last taken ops has run: release its host blocks."""
        self.tiers.end_step()

    def check_integrity(self) -> None:
        self.device.check_integrity()
        if self.host is not None:
            self.host.check_integrity()
        held: dict[int, int] = {}
        for table in [*self._tables.values(), *self._holds.values()]:
            for block_id in table:
                held[block_id] = held.get(block_id, 0) + 1
        for block_id in range(self.device.num_blocks):
            if self.device.ref_count(block_id) != held.get(block_id, 0):
                raise AssertionError(
                    f"device block {block_id}: {self.device.ref_count(block_id)} references, "
                    f"{held.get(block_id, 0)} tables and holds have it"
                )
        self.tiers.check_refs()
