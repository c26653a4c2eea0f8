"""A rank's side of its instance's PD role and transfer mode: the KV data plane the worker runs.

Chosen once from config (`kv_plane`), so the worker holds no role or mode flag: where the rank's KV cache
is allocated (a shared-memory file when a peer on this host writes into it), which transfer engines it
runs (disagg.transfer) with the sender that drives them, and whether CUDA graphs may serve decode steps
(not on a prefill instance). The storage mode moves bytes through the host tier and pool
(worker.kv_tiers), so it has no engines here.
"""

from __future__ import annotations

import torch

from pdserve.config import DisaggConfig
from pdserve.disagg.sender import KVSender
from pdserve.disagg.transfer.base import TransferEngine, open_engines
from pdserve.disagg.transfer.shm import allocate_shared, release_shared, shm_available
from pdserve.messages import KVRegion


class KVPlane:
    """No transfer engines (mixed; storage mode): the cache is plain device memory."""

    allows_decode_graphs = True

    def __init__(self, config: DisaggConfig) -> None:
        self.config = config
        self.engines: dict[str, TransferEngine] = {}
        self.sender: KVSender | None = None  # drives the engines for a plan's kv_sends (P only)
        self.shm_path: str | None = None

    def allocate_cache(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, rank: int
    ) -> torch.Tensor:
        """This rank's KV cache [num_layers, 2, num_blocks, block_size, heads, dim], zeroed."""
        return torch.zeros(*shape, dtype=dtype, device=device)

    def open(self, kv_cache: torch.Tensor, rank: int, num_layers: int) -> None:  # noqa: B027 - optional hook
        """Start the engines over the allocated cache."""

    def regions(self) -> list[KVRegion]:
        """How peers can write into this rank's KV cache (empty unless it receives)."""
        return [r for r in (e.region() for e in self.engines.values()) if r is not None]

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()
        for engine in self.engines.values():
            engine.close()
        if self.shm_path is not None:
            release_shared(self.shm_path)
            self.shm_path = None


class SendPlane(KVPlane):
    """Direct mode, P: engines that write into D's caches, layer by layer, driven by the sender."""

    allows_decode_graphs = False  # a prefill instance's steps compute prompts

    def open(self, kv_cache: torch.Tensor, rank: int, num_layers: int) -> None:
        c = self.config
        self.engines = open_engines(c.transfer_engine, kv_cache, self.shm_path, receive=False, host=c.control_host)
        if self.engines:
            self.sender = KVSender(self.engines, rank, num_layers, c.send_trace_dir, c.fault_delay_ms)


class ReceivePlane(KVPlane):
    """Direct mode, D: engines through which P writes into this cache; on CPU the cache lives in a
    shared-memory file, so a peer on this host writes straight into it."""

    def allocate_cache(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, rank: int
    ) -> torch.Tensor:
        if device.type == "cpu" and self.config.transfer_engine != "mooncake" and shm_available():
            kv_cache, self.shm_path = allocate_shared(shape, dtype, f"rank{rank}")
            return kv_cache
        return super().allocate_cache(shape, dtype, device, rank)

    def open(self, kv_cache: torch.Tensor, rank: int, num_layers: int) -> None:
        c = self.config
        self.engines = open_engines(c.transfer_engine, kv_cache, self.shm_path, receive=True, host=c.control_host)
        if self.engines:  # a sender too, as before: D's plans carry no kv_sends, so it stays idle
            c = self.config
            self.sender = KVSender(self.engines, rank, num_layers, c.send_trace_dir, c.fault_delay_ms)


class StoragePrefillPlane(KVPlane):
    """Storage mode, P: no engines (the pool writes go through the host tier), no decode graphs."""

    allows_decode_graphs = False


def kv_plane(config: DisaggConfig) -> KVPlane:
    """The data plane for this instance's role and transfer mode."""
    if config.role == "mixed":
        return KVPlane(config)
    if config.is_storage:
        return StoragePrefillPlane(config) if config.role == "prefill" else KVPlane(config)
    return SendPlane(config) if config.role == "prefill" else ReceivePlane(config)
