"""The host tier and the pool as the KV manager plans them: which host block holds which key, the copies
the workers must run (messages.CacheOps), which host blocks those copies and pool reads still use, and
which keys the pool is known to hold.

Order of the recorded ops within one step (workers run them in this order): swap_out (device -> host)
before swap_in (host -> device) before the forward, pool puts after it. So a device block evicted and
reused in the same step is saved before it is overwritten. Host blocks named by an op hold a reference
until the step that carries the op has run (end_step), so they can be neither evicted nor reused under a
running copy.

This module knows host block ids and keys; it knows nothing about requests' device block tables (that is
kvcache.manager) nor about tensors (the workers' worker.kv_tiers).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.kvcache.block_pool import BlockPool
from pdserve.messages import CacheOps

MAX_KNOWN_POOL_KEYS = 1 << 20


@dataclass(frozen=True)
class PoolLoad:
    """Read `keys` (the blocks after a request's device and host hits; in storage mode a prompt's blocks,
    the last maybe a `:partial:N` name) into host blocks."""

    req_id: str
    keys: Sequence[bytes | str]
    host_block_ids: list[int]


class HostTiers:
    """The optional host tier (a BlockPool of host blocks) and the optional pool behind it."""

    def __init__(self, num_host_blocks: int, has_pool: bool) -> None:
        if has_pool and not num_host_blocks:
            raise ValueError("a pool needs a host tier to stage its blocks")
        self.host = BlockPool(num_host_blocks) if num_host_blocks else None
        self.has_pool = has_pool
        self._loaded_from_pool: dict[str, set[bytes]] = {}  # keys just read for a waiting request
        self._held_for_admission: dict[str, list[int]] = {}  # host blocks read for a waiting request, held
        self._loading: dict[str, list[int]] = {}  # host blocks of planned pool loads not yet finished
        self._pool_keys: OrderedDict[bytes, None] = OrderedDict()  # keys known to be in the pool
        self._ops = _OpsBuilder()
        self._refs_pending: list[int] = []  # host refs of recorded ops not yet in a plan
        self._refs_in_flight: list[int] = []  # host refs of ops in the plan being executed

    @property
    def num_host_blocks(self) -> int:
        return self.host.num_blocks if self.host is not None else 0

    # ---- matching ------------------------------------------------------------------

    def match(self, keys: Sequence[bytes]) -> list[int]:
        """Host blocks holding the longest prefix of `keys`."""
        return self.host.match(keys) if self.host is not None else []

    def num_loaded(self, req_id: str, keys: Sequence[bytes]) -> int:
        """How many of `keys` were just read from the pool for `req_id` (they count as pool hits)."""
        loaded = self._loaded_from_pool.get(req_id, ())
        return sum(1 for key in keys if key in loaded)

    def swap_in(self, host_id: int, device_id: int) -> None:
        """Copy a host block into a device block before the next forward; `host_id` is referenced already."""
        self._ops.swap_in.append((host_id, device_id))
        self._refs_pending.append(host_id)

    # ---- saving: device -> host -> pool --------------------------------------------

    def save(self, blocks: Sequence[tuple[int, bytes]]) -> int:
        """Copy device blocks (block, key) to the host tier and write them through to the pool.

        Runs on blocks being evicted or freed; returns how many are now on the host.
        """
        if self.host is None:
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
                self.remember_in_pool(key)
        return num_saved

    def is_in_pool(self, key: bytes) -> bool:
        return key in self._pool_keys

    def remember_in_pool(self, key: bytes) -> None:
        """The pool holds `key` (written or read by every rank): it need not be written again."""
        self._pool_keys[key] = None
        self._pool_keys.move_to_end(key)
        if len(self._pool_keys) > MAX_KNOWN_POOL_KEYS:
            self._pool_keys.popitem(last=False)

    # ---- pool reads for waiting requests ---------------------------------------------

    def plan_pool_load(self, req_id: str, host_hit_ids: list[int], keys: Sequence[bytes]) -> PoolLoad | None:
        """Host blocks to read `keys` (the blocks after the host hits `host_hit_ids`) into, as many as are
        free; they are held (not matchable, not evictable) until finish_pool_load."""
        if not keys or self.host is None:
            return None
        self.host.ref(host_hit_ids)  # never evict the host hits we are extending
        num = min(len(keys), self.host.num_free_blocks)
        host_ids, _ = self.host.allocate(num)  # evicted host blocks are dropped: the pool has them
        self.host.free(host_hit_ids)
        if not host_ids:
            return None
        self._loading[req_id] = host_ids
        return PoolLoad(req_id, keys[:num], host_ids)

    def finish_pool_load(self, load: PoolLoad, num_loaded: int) -> None:
        """Name the first `num_loaded` blocks (read completely on every rank); free the rest."""
        assert self.host is not None
        self._loading.pop(load.req_id, None)
        keys = [k for k in load.keys[:num_loaded] if isinstance(k, bytes)]  # prefix loads name full blocks only
        for key, host_id in zip(keys, load.host_block_ids):
            self.host.cache(host_id, key)
            self.remember_in_pool(key)
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

    def forget(self, req_id: str) -> None:
        """The request was admitted (its hits are referenced by swap-ins now) or freed: drop what its
        pool reads held."""
        self._loaded_from_pool.pop(req_id, None)
        self._release_loaded(req_id)

    # ---- host blocks for a whole prompt (PD storage mode, disagg.storage) ----------------

    def allocate_for_write(self, keys: Sequence[bytes], num: int) -> list[int] | None:
        """`num` host blocks to stage a write carried by the plan just built (held until its end_step), the
        first len(keys) named; None if the tier has no room for them now."""
        if self.host is None or self.host.num_free_blocks < num:
            return None
        host_ids, _ = self.host.allocate(num)  # evicted host blocks are dropped: the pool has them
        for host_id, key in zip(host_ids, keys):
            self.host.cache(host_id, key)
        self._refs_in_flight.extend(host_ids)
        return host_ids

    def allocate_for_read(self, req_id: str, num: int) -> list[int] | None:
        """`num` host blocks to read a request's blocks into (held until finish_read); None if no room."""
        if self.host is None or self.host.num_free_blocks < num:
            return None
        host_ids, _ = self.host.allocate(num)
        self._loading[req_id] = host_ids
        return host_ids

    def finish_read(self, load: PoolLoad, num_used: int, keys: Sequence[bytes], device_ids: Sequence[int]) -> None:
        """Copy the first `num_used` host blocks read into `device_ids` (swap-ins before the next forward),
        naming the first len(keys) (they stay cached on the host, known to be in the pool); free the rest."""
        assert self.host is not None
        self._loading.pop(load.req_id, None)
        for i, host_id in enumerate(load.host_block_ids[:num_used]):
            if i < len(keys):
                self.host.cache(host_id, keys[i])
                self.remember_in_pool(keys[i])  # read from the pool: no need to write it back
            self.swap_in(host_id, device_ids[i])
        self.host.free(load.host_block_ids[num_used:])

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

    def check_refs(self) -> None:
        """Every host block's references are its ops' and its pool reads' (the pool's own integrity is
        BlockPool.check_integrity)."""
        if self.host is None:
            return
        held: dict[int, int] = {}
        for block_id in [
            *self._refs_pending,
            *self._refs_in_flight,
            *(b for ids in self._held_for_admission.values() for b in ids),
            *(b for ids in self._loading.values() for b in ids),
        ]:
            held[block_id] = held.get(block_id, 0) + 1
        for block_id in range(self.host.num_blocks):
            if self.host.ref_count(block_id) != held.get(block_id, 0):
                raise AssertionError(
                    f"host block {block_id}: {self.host.ref_count(block_id)} references, "
                    f"{held.get(block_id, 0)} held by ops or waiting requests"
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
