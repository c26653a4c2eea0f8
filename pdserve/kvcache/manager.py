"""Which blocks each request holds, and how blocks move between the tiers.

The device tier holds the blocks requests compute into; the optional host
tier holds blocks evicted from the device, saved on preemption, or read from
the pool; the optional pool (Mooncake Store, file, memory) is written through
from the host tier. The manager decides every move and records it as a
CacheOps entry for the workers (messages.CacheOps); it never touches tensors.

Order of the recorded ops within one step (workers run them in this order):
swap_out (device -> host) before swap_in (host -> device) before the forward,
pool puts after it. So a device block evicted and reused in the same step is
saved before it is overwritten. Host blocks named by an op hold a reference
until the step that carries the op has run (end_step), so they can be neither
evicted nor reused under a running copy.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from pdserve.kvcache.block_pool import BlockPool
from pdserve.kvcache.keys import chain_keys, partial_key
from pdserve.messages import CacheOps
from pdserve.request import Request

MAX_KNOWN_POOL_KEYS = 1 << 20


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


@dataclass(frozen=True)
class PoolLoad:
    """Read `keys` (the blocks after a request's device and host hits; in storage mode a prompt's blocks,
    the last maybe a `:partial:N` name) into host blocks."""

    req_id: str
    keys: Sequence[bytes | str]
    host_block_ids: list[int]


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
        if has_pool and not num_host_blocks:
            raise ValueError("a pool needs a host tier to stage its blocks")
        self.block_size = block_size
        self.root = root
        self.device = BlockPool(num_blocks)
        self.host = BlockPool(num_host_blocks) if num_host_blocks else None
        self.has_pool = has_pool
        self.enable_prefix_caching = enable_prefix_caching
        self.preempt_save = preempt_save and self.host is not None
        self.cache_output = cache_output
        self.stats = CacheStats()
        self._tables: dict[str, list[int]] = {}
        self._holds: dict[str, list[int]] = {}  # holder -> device blocks it references (see hold())
        self._num_named: dict[str, int] = {}  # leading blocks of a table already offered to the index
        self._saved: set[str] = set()  # preempted requests whose blocks were saved
        self._loaded_from_pool: dict[str, set[bytes]] = {}  # keys just read for a waiting request
        self._held_for_admission: dict[str, list[int]] = {}  # host blocks read for a waiting request, held
        self._loading: dict[str, list[int]] = {}  # host blocks of planned pool loads not yet finished
        self._pool_keys: OrderedDict[bytes, None] = OrderedDict()  # keys known to be in the pool
        self._ops = _OpsBuilder()
        self._refs_pending: list[int] = []  # host refs of recorded ops not yet in a plan
        self._refs_in_flight: list[int] = []  # host refs of ops in the plan being executed

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
        return self.host.num_blocks if self.host is not None else 0

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
        return self.enable_prefix_caching or request.req_id in self._saved

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
        host_ids = self.host.match(keys[len(device_ids) :]) if self.host else []
        loaded = self._loaded_from_pool.get(request.req_id, ())
        host_keys = keys[len(device_ids) : len(device_ids) + len(host_ids)]
        return MatchResult(device_ids, host_ids, sum(1 for key in host_keys if key in loaded))

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
        if not keys or self.host is None:
            return None
        self.host.ref(match.host_block_ids)  # never evict the host hits we are extending
        num = min(len(keys), self.host.num_free_blocks)
        host_ids, _ = self.host.allocate(num)  # evicted host blocks are dropped: the pool has them
        self.host.free(match.host_block_ids)
        if not host_ids:
            return None
        self._loading[request.req_id] = host_ids
        return PoolLoad(request.req_id, keys[:num], host_ids)

    def finish_pool_load(self, load: PoolLoad, num_loaded: int) -> None:
        """Name the first `num_loaded` blocks (read completely on every rank); free the rest."""
        assert self.host is not None
        self._loading.pop(load.req_id, None)
        keys = [k for k in load.keys[:num_loaded] if isinstance(k, bytes)]  # prefix loads name full blocks only
        for key, host_id in zip(keys, load.host_block_ids):
            self.host.cache(host_id, key)
            self._remember_pool_key(key)
        self._loaded_from_pool[load.req_id] = set(keys)
        self.host.free(load.host_block_ids[num_loaded:])
        # the blocks read stay held for the request until it is admitted (or freed), so that other
        # admissions in the meantime cannot evict them
        self._release_loaded(load.req_id)
        self._held_for_admission[load.req_id] = load.host_block_ids[:num_loaded]

    def _release_loaded(self, req_id: str) -> None:
        held = self._held_for_admission.pop(req_id, None)
        if held and self.host is not None:
            self.host.free(held)

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
                self._ops.swap_in.append((host_id, device_id))
                self._refs_pending.append(host_id)
                if self.enable_prefix_caching:
                    self.device.cache(device_id, keys[len(table)])
                table.append(device_id)
            new_ids = new_ids[len(match.host_block_ids) :]
            self._num_named[req_id] = len(table)
        if is_admission:
            self._count_hits(request, match)
            self._loaded_from_pool.pop(req_id, None)
            self._release_loaded(req_id)  # the matched ones are referenced by the swap-ins now
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

    # ---- storage-mode transfer: a prompt's blocks through the pool ------------------------

    def prompt_object_keys(self, request: Request) -> list[str]:
        """The pool names of the request's prompt blocks: chained keys of the full blocks, then
        `<key>:partial:N` for an incomplete last block (kvcache.keys)."""
        bs = self.block_size
        prompt = request.prompt_token_ids
        full = self.keys_for(request)[: len(prompt) // bs]
        partial = partial_key(self.root, full, prompt, bs)
        return [k.hex() for k in full] + ([partial] if partial is not None else [])

    def stage_prompt(self, request: Request) -> list[int] | None:
        """P: host blocks to stage the request's prompt blocks in for a pool write carried by the plan just
        built (held until its end_step); None if the host tier has no room for them now. Full blocks are
        named, so they stay cached on the host after the write."""
        num = num_blocks_for(request.num_prompt_tokens, self.block_size)
        if self.host is None or self.host.num_free_blocks < num:
            return None
        host_ids, _ = self.host.allocate(num)  # evicted host blocks are dropped: the pool has them
        for host_id, key in zip(host_ids, self.keys_for(request)[: request.num_prompt_tokens // self.block_size]):
            self.host.cache(host_id, key)
        self._refs_in_flight.extend(host_ids)
        return host_ids

    def note_in_pool(self, keys: Sequence[bytes]) -> None:
        """Every rank wrote these blocks to the pool: a finished request need not write them again."""
        for key in keys:
            self._remember_pool_key(key)

    def plan_prompt_load(self, request: Request) -> PoolLoad | None:
        """D: host blocks to read the request's prompt blocks into (prompt_object_keys); None if the host
        tier has no room for them now. Pass the load to finish_prompt_load once read."""
        num = num_blocks_for(request.num_prompt_tokens, self.block_size)
        if self.host is None or self.host.num_free_blocks < num:
            return None
        host_ids, _ = self.host.allocate(num)
        self._loading[request.req_id] = host_ids
        return PoolLoad(request.req_id, self.prompt_object_keys(request), host_ids)

    def finish_prompt_load(self, request: Request, load: PoolLoad, num_used: int) -> None:
        """Copy the first `num_used` blocks read into the request's device blocks (swap-ins before the next
        forward) and free the other host blocks. Full blocks stay cached on the host."""
        assert self.host is not None
        self._loading.pop(load.req_id, None)
        table = self._tables[request.req_id]
        full_keys = self.keys_for(request)
        for i, host_id in enumerate(load.host_block_ids[:num_used]):
            if i < len(full_keys) and i < request.num_prompt_tokens // self.block_size:
                self.host.cache(host_id, full_keys[i])
                self._remember_pool_key(full_keys[i])  # read from the pool: no need to write it back
            self._ops.swap_in.append((host_id, table[i]))
            self._refs_pending.append(host_id)
        self.host.free(load.host_block_ids[num_used:])

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
        self._loaded_from_pool.pop(req_id, None)
        self._release_loaded(req_id)
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
            todo = [(b, k) for b, k in zip(table[:num_full], keys[:num_full]) if k not in self._pool_keys]
            self._save(todo, to_host=True)
        self.device.free(table[::-1])  # the tail is evicted first, the shared prefix last

    def _save(self, blocks: Sequence[tuple[int, bytes]], *, to_host: bool) -> int:
        """Copy device blocks (block, key) to the host tier and write them through to the pool.

        Runs on blocks being evicted or freed; returns how many are now on the host.
        """
        if self.host is None or not to_host:
            return 0
        num_saved = 0
        for device_id, key in blocks:
            host_id = self.host.lookup(key)
            if host_id is not None:
                self.host.ref([host_id])
            elif self.host.num_free_blocks:
                [host_id], _ = self.host.allocate(1)  # evicted host blocks are dropped
                self.host.cache(host_id, key)
                self._ops.swap_out.append((device_id, host_id))
            else:
                continue  # every host block is busy this step: the block is lost, not an error
            self._refs_pending.append(host_id)
            num_saved += 1
            if self.has_pool and key not in self._pool_keys:
                self._ops.pool_put.append((host_id, key.hex()))
                self._remember_pool_key(key)
        return num_saved

    def _remember_pool_key(self, key: bytes) -> None:
        self._pool_keys[key] = None
        self._pool_keys.move_to_end(key)
        if len(self._pool_keys) > MAX_KNOWN_POOL_KEYS:
            self._pool_keys.popitem(last=False)

    # ---- steps -----------------------------------------------------------------------

    @property
    def has_pending_ops(self) -> bool:
        return not self._ops.is_empty

    def take_ops(self) -> CacheOps:
        """The ops recorded since the last plan; their host blocks stay held until end_step."""
        ops = self._ops.build()
        self._ops = _OpsBuilder()
        self._refs_in_flight.extend(self._refs_pending)
        self._refs_pending = []
        return ops

    def end_step(self) -> None:
        """The plan carrying the last taken ops has run: release its host blocks."""
        if self.host is not None:
            self.host.free(self._refs_in_flight)
        self._refs_in_flight = []

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
        if self.host is not None:
            host_held: dict[int, int] = {}
            for block_id in [
                *self._refs_pending,
                *self._refs_in_flight,
                *(b for ids in self._held_for_admission.values() for b in ids),
                *(b for ids in self._loading.values() for b in ids),
            ]:
                host_held[block_id] = host_held.get(block_id, 0) + 1
            for block_id in range(self.host.num_blocks):
                if self.host.ref_count(block_id) != host_held.get(block_id, 0):
                    raise AssertionError(
                        f"host block {block_id}: {self.host.ref_count(block_id)} references, "
                        f"{host_held.get(block_id, 0)} held by ops or waiting requests"
                    )


class _OpsBuilder:
    def __init__(self) -> None:
        self.swap_out: list[tuple[int, int]] = []
        self.swap_in: list[tuple[int, int]] = []
        self.pool_put: list[tuple[int, str]] = []

    @property
    def is_empty(self) -> bool:
        return not (self.swap_out or self.swap_in or self.pool_put)

    def build(self) -> CacheOps:
        return CacheOps(swap_out=self.swap_out, swap_in=self.swap_in, pool_put=self.pool_put)
