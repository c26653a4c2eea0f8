"""Same-host transfers through shared memory (CPU).

The receiving rank allocates its KV cache in a file under /dev/shm; a sender maps that file once and
copies blocks straight into it (index_select from its own cache, index_copy into the peer's), one
layer at a time. Files are named after the owning process, so a start-up sweep removes those of
processes that died without cleaning up.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from pdserve.disagg.transfer.base import PeerMappings, TransferEngine, TransferError, block_runs, check_peer, hostname
from pdserve.messages import KVRegion

SHM_DIR = Path("/dev/shm")
_NAME = re.compile(r"^pdserve-kv-(\d+)-")


def shm_available() -> bool:
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


def sweep_stale() -> None:
    """Remove KV files left by processes that no longer run."""
    if not shm_available():
        return
    for path in SHM_DIR.glob("pdserve-kv-*"):
        match = _NAME.match(path.name)
        if match is None:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                path.unlink()
        except PermissionError:
            pass


def allocate_shared(shape: Sequence[int], dtype: torch.dtype, tag: str) -> tuple[torch.Tensor, str]:
    """A zeroed tensor backed by a new /dev/shm file (removed by release_shared or the next sweep)."""
    sweep_stale()
    path = SHM_DIR / f"pdserve-kv-{os.getpid()}-{tag}"
    numel = 1
    for n in shape:
        numel *= n
    tensor = torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(*shape)
    tensor.zero_()
    return tensor, str(path)


def release_shared(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _runs(ids: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs of `ids` as [start, stop) pairs."""
    runs: list[tuple[int, int]] = []
    for i in ids:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


class ShmEngine(TransferEngine):
    name = "shm"

    def __init__(self, kv_cache: torch.Tensor, path: str | None) -> None:
        super().__init__(kv_cache)
        self.path = path
        self._peers = PeerMappings()

    def region(self) -> KVRegion | None:
        if self.path is None:
            return None
        return KVRegion(
            engine="shm",
            hostname=hostname(),
            address=self.path,
            base=0,
            num_layers=self.num_layers,
            num_blocks=self.num_blocks,
            chunk_nbytes=self.chunk_nbytes,
        )

    def _map(self, peer: KVRegion) -> torch.Tensor:
        def open_peer() -> torch.Tensor:
            shape = (peer.num_layers, 2, peer.num_blocks, *self.kv_cache.shape[3:])
            numel = peer.num_layers * 2 * peer.num_blocks * self.kv_cache[0, 0, 0].numel()
            if not os.path.exists(peer.address):
                raise TransferError(f"the peer's KV cache {peer.address} does not exist (did the peer exit?)")
            try:
                return torch.from_file(peer.address, shared=True, size=numel, dtype=self.kv_cache.dtype).view(shape)
            except RuntimeError as e:
                raise TransferError(f"cannot map the peer's KV cache {peer.address}: {e}") from e

        return self._peers.get(peer.address, open_peer)

    def write(
        self, peer: KVRegion, layers: Sequence[int], src_block_ids: Sequence[int], dst_block_ids: Sequence[int]
    ) -> int:
        check_peer(self, peer, dst_block_ids)
        if not os.path.exists(peer.address):
            self._peers.forget(peer.address)
            raise TransferError(f"the peer's KV cache {peer.address} is gone (the peer exited)")
        dst = self._map(peer)
        for l0, l1 in _runs(list(layers)):
            for s0, d0, n in block_runs(src_block_ids, dst_block_ids):
                # [layers, 2, n, block_size, heads, dim]: plain slice copies (gathers run ~7x slower)
                dst[l0:l1, :, d0 : d0 + n].copy_(self.kv_cache[l0:l1, :, s0 : s0 + n])
        return len(layers) * 2 * len(src_block_ids) * self.chunk_nbytes

    def close(self) -> None:
        self._peers.forget()
