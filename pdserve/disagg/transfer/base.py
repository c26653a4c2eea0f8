"""The transfer engine contract (worker half of the data plane).

A rank's device KV cache is one tensor [num_layers, 2, num_blocks, block_size, heads, dim], so a
(layer, K|V, block) chunk is contiguous: chunk (l, kv, b) starts at byte
((l * 2 + kv) * num_blocks + b) * chunk_nbytes. The receiving side registers its cache once and
describes it as a KVRegion; the sending side writes whole chunks into it (a one-sided write: the
receiver's CPU does nothing per transfer).
"""

from __future__ import annotations

import logging
import socket
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from pdserve.messages import KVRegion

if TYPE_CHECKING:  # the contract names tensors; the engines that move them import torch
    import torch

logger = logging.getLogger(__name__)


class TransferError(RuntimeError):
    """A write to a peer failed (unreachable, refused, out of range); the message says which peer and why."""


def chunk_offset(layer: int, kv: int, block: int, num_blocks: int, chunk_nbytes: int) -> int:
    """Byte offset of chunk (layer, K|V, block) in a cache of `num_blocks` blocks."""
    return ((layer * 2 + kv) * num_blocks + block) * chunk_nbytes


def hostname() -> str:
    return socket.gethostname()


class TransferEngine(ABC):
    """Writes KV blocks from this rank's cache into peers' caches.

    One instance per worker rank, created once with the rank's cache (which it registers once).
    `write` may be called from a sender thread while the model runs on the main thread; it must not
    touch the local cache's blocks other than those named (it only reads them).
    """

    name: str

    def __init__(self, kv_cache: torch.Tensor) -> None:
        self.kv_cache = kv_cache  # [num_layers, 2, num_blocks, block_size, heads, dim]
        self.num_layers = kv_cache.shape[0]
        self.num_blocks = kv_cache.shape[2]
        self.chunk_nbytes = kv_cache[0, 0, 0].numel() * kv_cache.element_size()

    @abstractmethod
    def region(self) -> KVRegion | None:
        """How a peer writes into this rank's cache through this engine (None: this engine only sends)."""

    @abstractmethod
    def write(
        self, peer: KVRegion, layers: Sequence[int], src_block_ids: Sequence[int], dst_block_ids: Sequence[int]
    ) -> int:
        """Copy K and V of `layers` for blocks src_block_ids[i] -> dst_block_ids[i] into `peer`.

        Blocks until the data is in the peer's memory (with waits_on_device: until flush()); returns the
        bytes written. Raises TransferError (never anything else) when the peer cannot be reached or the
        ids are out of its range.
        """

    # True: write() queues device work ordered after wait(event), and flush() waits for it; False: the
    # caller waits for the event on the host first, and write() returns with the data in place
    waits_on_device = False

    def wait(self, event: torch.cuda.Event) -> None:  # noqa: B027 - only engines that wait on the device override it
        """Order the following writes after `event` (only called when waits_on_device)."""

    def flush(self) -> None:  # noqa: B027 - synchronous engines have nothing to wait for
        """Wait until every write so far is in the peers' memory; raises TransferError if one failed."""

    def close(self) -> None:  # noqa: B027 - engines with nothing to release keep this default
        """Release registrations and mappings; safe to call twice."""


class PeerMappings:
    """The peers' caches this engine has mapped, by address; peers come and go, so at most MAX of them."""

    MAX = 64

    def __init__(self) -> None:
        self._by_address: dict[str, torch.Tensor] = {}

    def get(self, address: str, open_peer: Callable[[], torch.Tensor]) -> torch.Tensor:
        tensor = self._by_address.get(address)
        if tensor is None:
            tensor = open_peer()
            if len(self._by_address) >= self.MAX:
                self._by_address.pop(next(iter(self._by_address)))
            self._by_address[address] = tensor
        return tensor

    def forget(self, address: str | None = None) -> None:
        """Drop one mapping (None: all)."""
        if address is None:
            self._by_address.clear()
        else:
            self._by_address.pop(address, None)


def block_runs(src: Sequence[int], dst: Sequence[int]) -> list[tuple[int, int, int]]:
    """(src start, dst start, length) runs where both sides are consecutive."""
    runs: list[list[int]] = []
    for s, d in zip(src, dst):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1][2] += 1
        else:
            runs.append([s, d, 1])
    return [(s, d, n) for s, d, n in runs]


def check_peer(engine: TransferEngine, peer: KVRegion, dst_block_ids: Sequence[int]) -> None:
    if peer.num_layers != engine.num_layers or peer.chunk_nbytes != engine.chunk_nbytes:
        raise TransferError(
            f"peer cache {peer.address} has {peer.num_layers} layers of {peer.chunk_nbytes}-byte "
            f"chunks; this rank has {engine.num_layers} of {engine.chunk_nbytes}"
        )
    bad = next((b for b in dst_block_ids if not 0 <= b < peer.num_blocks), None)
    if bad is not None:
        raise TransferError(f"block {bad} is outside the {peer.num_blocks} blocks of the peer's cache {peer.address}")


def open_engines(
    kind: str, kv_cache: torch.Tensor, shm_path: str | None, receive: bool = False, host: str = "127.0.0.1"
) -> dict[str, TransferEngine]:
    """The engines this rank runs for `--kv-transfer-engine kind` ("auto" | "shm" | "cuda_ipc" | "mooncake").

    auto: shm on CPU (receiving too when the cache lives in the shared-memory file `shm_path`), cuda_ipc
    on CUDA (exporting the cache when `receive`), plus mooncake when it is installed; a sender picks per
    peer by locality (pick_region). Mooncake listens on, and advertises, `host` (the instance's
    --control-host: loopback unless the deployment spans hosts).
    """
    engines: dict[str, TransferEngine] = {}
    if kind in ("auto", "cuda_ipc") and kv_cache.device.type == "cuda":
        from pdserve.disagg.transfer.cuda_ipc import CudaIpcEngine

        engines["cuda_ipc"] = CudaIpcEngine(kv_cache, receive)
    if kind == "cuda_ipc" and kv_cache.device.type != "cuda":
        raise ValueError("--kv-transfer-engine cuda_ipc needs the KV cache on a GPU; use shm or mooncake")
    if kind in ("auto", "shm") and kv_cache.device.type == "cpu":
        from pdserve.disagg.transfer.shm import ShmEngine

        engines["shm"] = ShmEngine(kv_cache, shm_path)  # no path: it only sends
    if kind == "shm" and kv_cache.device.type != "cpu":
        raise ValueError("--kv-transfer-engine shm needs the KV cache in host memory (CPU); use mooncake")
    if kind in ("auto", "mooncake"):
        try:
            from pdserve.disagg.transfer.mooncake import MooncakeEngine

            engines["mooncake"] = MooncakeEngine(kv_cache, host)
        except (ImportError, TransferError) as e:
            if kind == "mooncake":
                raise ValueError(
                    f"--kv-transfer-engine mooncake cannot start: {e}; install the Mooncake Transfer "
                    "Engine with pip install 'pdserve[mooncake]'"
                ) from e
            if not engines:
                raise ValueError(
                    f"no KV transfer engine can run here: Mooncake is unavailable ({e}) and shared "
                    "memory needs a CPU KV cache"
                ) from e
            logger.info("KV transfer: %s only (Mooncake unavailable: %s)", ", ".join(engines), e)
    return engines


def pick_region(engines: dict[str, TransferEngine], offered: Sequence[KVRegion]) -> tuple[TransferEngine, KVRegion]:
    """The engine and peer region to use: shared memory or CUDA IPC on the same host first, else mooncake."""
    local = hostname()
    for preference in ("shm", "cuda_ipc", "mooncake"):
        engine = engines.get(preference)
        for region in offered:
            if (
                engine is not None
                and region.engine == preference
                and (preference == "mooncake" or region.hostname == local)
            ):
                return engine, region
    kinds = ", ".join(sorted({r.engine for r in offered})) or "none"
    raise TransferError(
        f"no common transfer engine: the peer offers {kinds}; this rank runs {', '.join(sorted(engines)) or 'none'}"
    )
