"""This rank's host tier and pool client: runs the block copies the engine core decided.

Device layout [num_layers, 2, num_blocks, block_size, kv_heads, head_dim];
host layout (block-major) [num_host_blocks, num_layers, 2, block_size, kv_heads, head_dim],
so one host block is one contiguous object: the unit of a pool put or get.
Pool objects are named `<key>@<rank>` (kvcache.keys.object_key).

Store failures never escape: they are counted, logged once per kind, and the
blocks concerned read as misses.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from pdserve.disagg.transfer.base import block_runs
from pdserve.kvcache.keys import object_key
from pdserve.layers.device import to_device
from pdserve.messages import CacheOps, KVSendReport, PoolSend, StoreCounters
from pdserve.store import KVStore, StoreError, open_store

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 60.0  # longest wait for a timed-out store call to let go of its host blocks


def _host_runs(host_ids: list[int]) -> list[tuple[int, int, int]]:
    """(index in host_ids, first host block, length) of each run of consecutive host blocks."""
    return block_runs(range(len(host_ids)), host_ids)


def swap_out(kv_cache: torch.Tensor, host: torch.Tensor, device_ids: list[int], host_ids: list[int]) -> None:
    """host[h] = kv_cache[:, :, d] for each pair: one gather on the device straight into the block-major
    layout, then one copy per run of consecutive host blocks (an async DMA when the host tier is pinned;
    the caller synchronizes before the CPU reads them)."""
    index = to_device(device_ids, kv_cache.device, torch.int64)
    staged = kv_cache.index_select(2, index).permute(2, 0, 1, 3, 4, 5).contiguous()  # [n, L, 2, bs, h, d]
    for i, first, n in _host_runs(host_ids):
        host[first : first + n].copy_(staged[i : i + n], non_blocking=True)


def swap_in(kv_cache: torch.Tensor, host: torch.Tensor, host_ids: list[int], device_ids: list[int]) -> None:
    """kv_cache[:, :, d] = host[h] for each pair: the host blocks go to the device in one copy per run of
    consecutive blocks, then one scatter kernel puts them in place."""
    staged = torch.empty((len(host_ids), *host.shape[1:]), dtype=host.dtype, device=kv_cache.device)
    for i, first, n in _host_runs(host_ids):
        staged[i : i + n].copy_(host[first : first + n], non_blocking=True)
    index = to_device(device_ids, kv_cache.device, torch.int64)
    kv_cache.index_copy_(2, index, staged.permute(1, 2, 0, 3, 4, 5))


def _leading_run(flags: list[bool]) -> int:
    """How many of `flags` are True before the first False."""
    return flags.index(False) if False in flags else len(flags)


class KVTiers:
    def __init__(
        self,
        kv_cache: torch.Tensor,
        num_host_blocks: int,
        rank: int,
        store_kind: str | None,
        store_options: dict[str, Any],
    ) -> None:
        self.kv_cache = kv_cache
        self.rank = rank
        num_layers, _, _, block_size, num_heads, head_dim = kv_cache.shape
        self.host = torch.zeros(
            num_host_blocks,
            num_layers,
            2,
            block_size,
            num_heads,
            head_dim,
            dtype=kv_cache.dtype,
            pin_memory=kv_cache.is_cuda,
        )
        self.store: KVStore | None = None
        self._num_errors = 0
        self._bytes_put = 0
        self._bytes_get = 0
        if store_kind is not None:
            try:
                self.store = open_store(store_kind, dict(store_options))
                self.store.register_buffer(self.host)
            except StoreError as e:
                raise RuntimeError(f"cannot open the {store_kind} KV store: {e}") from e

    @property
    def counters(self) -> StoreCounters:
        return StoreCounters(num_errors=self._num_errors, bytes_put=self._bytes_put, bytes_get=self._bytes_get)

    def copy(self, ops: CacheOps) -> None:
        """The copies that must precede the forward pass: save first, then restore."""
        if ops.swap_out:
            device_ids, host_ids = zip(*ops.swap_out)
            swap_out(self.kv_cache, self.host, list(device_ids), list(host_ids))
        if ops.swap_in:
            host_ids, device_ids = zip(*ops.swap_in)
            swap_in(self.kv_cache, self.host, list(host_ids), list(device_ids))

    def _sync(self) -> None:
        """Wait for the async copies between the device and the pinned host tier (CUDA only)."""
        if self.kv_cache.is_cuda:
            torch.cuda.current_stream(self.kv_cache.device).synchronize()

    def put(self, ops: CacheOps) -> None:
        """After the forward: let this step's copies finish (their host blocks are released at the step's
        end), then write host blocks through to the pool, skipping objects already there."""
        if ops.swap_out or ops.swap_in:
            self._sync()
        if self.store is None or not ops.pool_put:
            return
        names = [object_key(key, self.rank) for _, key in ops.pool_put]
        blocks = [self.host[host_id] for host_id, _ in ops.pool_put]
        try:
            present = self.store.exists(names)
            todo = [i for i, p in enumerate(present) if not p]
            if not todo:
                return
            done = self.store.put([names[i] for i in todo], [blocks[i] for i in todo])
        except Exception as e:  # noqa: BLE001 - any backend failure is a miss, never a crash (StoreError expected)
            self._fail("put", e, len(names))
            return
        failed = done.count(False)
        if failed:
            self._fail("put", f"{failed} of {len(done)} objects not written", failed)
        self._bytes_put += sum(blocks[i].nbytes for i, ok in zip(todo, done) if ok)

    def send(self, sends: list[PoolSend]) -> KVSendReport:
        """Storage mode, P: stage the sends' device blocks into their host blocks (one swap op for all), then
        write every object the pool does not hold yet. Unlike write-through puts, a failure is reported per
        room (never read as a miss): D must not be told the blocks are there."""
        started = time.perf_counter()
        swap_out(
            self.kv_cache,
            self.host,
            [b for s in sends for b in s.device_block_ids],
            [h for s in sends for h in s.host_block_ids],
        )
        self._sync()
        rooms = [s.room for s in sends for _ in s.keys]
        names = [object_key(key, self.rank) for s in sends for key in s.keys]
        blocks = [self.host[h] for s in sends for h in s.host_block_ids]
        failed: dict[str, str] = {}
        num_bytes = 0
        if self.store is None:
            failed = {s.room: "this instance has no KV store" for s in sends}
        else:
            try:
                present = self.store.exists(names)
                todo = [i for i, p in enumerate(present) if not p]
                done = self.store.put([names[i] for i in todo], [blocks[i] for i in todo]) if todo else []
            except Exception as e:  # noqa: BLE001 - any backend failure fails the rooms (StoreError expected)
                self._fail("put", e, len(names))
                failed = {s.room: f"the pool write failed ({e})" for s in sends}
            else:
                missing: dict[str, int] = {}
                for i, ok in zip(todo, done):
                    if ok:
                        num_bytes += blocks[i].nbytes
                    else:
                        missing[rooms[i]] = missing.get(rooms[i], 0) + 1
                for room, count in missing.items():
                    total = rooms.count(room)
                    failed[room] = f"{count} of {total} prompt blocks could not be written to the pool"
                if missing:
                    self._fail("put", f"{sum(missing.values())} objects not written", sum(missing.values()))
                self._bytes_put += num_bytes
        return KVSendReport(
            rank=self.rank, num_bytes=num_bytes, failed=failed, seconds_busy=time.perf_counter() - started
        )

    def count_present(self, keys: list[str]) -> int:
        """How many leading `keys` the pool holds (for this rank); 0 on any store failure."""
        if self.store is None or not keys:
            return 0
        try:
            present = self.store.exists([object_key(key, self.rank) for key in keys])
        except Exception as e:  # noqa: BLE001 - any backend failure is a miss, never a crash (StoreError expected)
            self._fail("exists", e, len(keys))
            return 0
        return _leading_run(present)

    def load(self, keys: list[str], host_ids: list[int]) -> int:
        """Read `keys` (counted present by count_present just before, or a storage-mode prompt) into
        `host_ids`; returns how many leading blocks were read completely."""
        if self.store is None or not keys:
            return 0
        blocks = [self.host[h] for h in host_ids[: len(keys)]]
        try:
            done = self.store.get([object_key(key, self.rank) for key in keys], blocks)
        except Exception as e:  # noqa: BLE001 - any backend failure is a miss, never a crash (StoreError expected)
            self._fail("get", e, len(keys))
            return 0
        num_read = _leading_run(done)
        if num_read < len(keys):
            self._fail("get", f"{len(keys) - num_read} of {len(keys)} objects could not be read", 1)
        self._bytes_get += sum(b.nbytes for b in blocks[:num_read])
        return num_read

    def _fail(self, op: str, error: object, count: int) -> None:
        self._num_errors += 1
        logger.warning(
            "KV store %s failed (%s); %d blocks treated as misses",
            op,
            error,
            count,
            exc_info=isinstance(error, Exception) and not isinstance(error, StoreError),
        )
        if isinstance(error, StoreError) and self.store is not None and not self.store.wait_idle(IDLE_WAIT_S):
            # NOTE: a call still running inside the store may touch these host blocks; they are reused next step
            logger.error("KV store call still running after %.0fs; host blocks may be overwritten", IDLE_WAIT_S)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
