"""Transfers across processes and hosts through the Mooncake Transfer Engine (TCP, P2P handshake).

Each rank runs one Mooncake engine, registers its whole KV cache once, and listens on an RPC port that
Mooncake picks; a peer writes with one-sided batch writes addressed to "host:port". No metadata server
is involved. This module knows nothing about requests or the step plan.

Mooncake's behaviour (measured with mooncake-transfer-engine-non-cuda 0.3.13.post1, TCP, loopback):
- initialize(host, "P2PHANDSHAKE", "tcp", "") takes ~1 ms and picks a free RPC port (get_rpc_port()).
- batch_transfer_sync_write releases the GIL while it copies; it returns 0 or -1 (the reason only goes
  to Mooncake's log on stderr).
- A destination outside the peer's registered memory is refused by the peer: -1 at once.
- A peer that exited or was killed: -1 at once (broken pipe, then connection refused; reconnect
  attempts back off, so later writes take up to ~1 s each).
- A peer that hangs (stopped, not dead): the write blocks 30 s (MC_TCP_PROGRESS_TIMEOUT_SEC), then -1.
- unregister_memory of an address not registered returns -3; dropping an engine takes ~1 s.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch

from pdserve.disagg.transfer.base import TransferEngine, TransferError, check_peer, chunk_offset
from pdserve.disagg.transfer.base import hostname as machine_name
from pdserve.messages import KVRegion
from pdserve.native import bind_here


def merge_runs(srcs: Sequence[int], dsts: Sequence[int], length: int) -> tuple[list[int], list[int], list[int]]:
    """(src address, dst address, length) runs: chunk i extends the run before it when both its source
    and its destination start where that run ends."""
    run_srcs: list[int] = []
    run_dsts: list[int] = []
    run_lens: list[int] = []
    for src, dst in zip(srcs, dsts):
        if run_lens and run_srcs[-1] + run_lens[-1] == src and run_dsts[-1] + run_lens[-1] == dst:
            run_lens[-1] += length
        else:
            run_srcs.append(src)
            run_dsts.append(dst)
            run_lens.append(length)
    return run_srcs, run_dsts, run_lens


class MooncakeEngine(TransferEngine):
    name = "mooncake"

    def __init__(self, kv_cache: torch.Tensor, hostname: str = "127.0.0.1") -> None:
        """Start a Mooncake engine listening on `hostname` (the address peers connect to) and register
        `kv_cache`, which must be contiguous. Raises TransferError when Mooncake refuses either step."""
        super().__init__(kv_cache)
        if not kv_cache.is_contiguous():
            raise ValueError("the KV cache must be one contiguous tensor to be registered with Mooncake")
        from mooncake.engine import TransferEngine as _MooncakeTE

        self.host = hostname
        self._base = kv_cache.data_ptr()
        self._nbytes = kv_cache.numel() * kv_cache.element_size()
        self._lock = threading.Lock()  # guards the three below; never held across a network call
        self._engine: Any = None
        self._num_in_flight = 0
        self._is_closing = False
        bind_here(hostname)  # its RPC and data ports bind the wildcard address: the shim sends them here
        engine = _MooncakeTE()
        code = engine.initialize(hostname, "P2PHANDSHAKE", "tcp", "")
        if code != 0:
            raise TransferError(
                f"cannot start a Mooncake transfer engine on {hostname} (code {code}); "
                "check that the hostname is an address of this machine"
            )
        self._port = engine.get_rpc_port()
        code = engine.register_memory(self._base, self._nbytes)
        if code != 0:
            raise TransferError(f"Mooncake refused to register the {self._nbytes}-byte KV cache (code {code})")
        self._engine = engine

    def region(self) -> KVRegion | None:
        return KVRegion(
            engine="mooncake",
            hostname=machine_name(),
            address=f"{self.host}:{self._port}",
            base=self._base,
            num_layers=self.num_layers,
            num_blocks=self.num_blocks,
            chunk_nbytes=self.chunk_nbytes,
        )

    def write(
        self, peer: KVRegion, layers: Sequence[int], src_block_ids: Sequence[int], dst_block_ids: Sequence[int]
    ) -> int:
        check_peer(self, peer, dst_block_ids)
        if len(src_block_ids) != len(dst_block_ids):
            raise TransferError(
                f"{len(src_block_ids)} source blocks but {len(dst_block_ids)} destination blocks "
                f"for peer {peer.address}"
            )
        bad = next((b for b in src_block_ids if not 0 <= b < self.num_blocks), None)
        if bad is not None:
            raise TransferError(f"source block {bad} is outside this rank's {self.num_blocks} blocks")
        if not 0 <= min(layers, default=0) <= max(layers, default=0) < self.num_layers:
            raise TransferError(f"layers {list(layers)} are outside this rank's {self.num_layers} layers")
        srcs, dsts = self._addresses(peer, layers, src_block_ids, dst_block_ids)
        if not srcs:
            return 0
        run_srcs, run_dsts, run_lens = merge_runs(srcs, dsts, self.chunk_nbytes)
        with self._lock:
            engine = self._engine
            if engine is None or self._is_closing:
                raise TransferError(f"cannot write to {peer.address}: this rank's Mooncake engine is closed")
            self._num_in_flight += 1
        try:
            code = engine.batch_transfer_sync_write(peer.address, run_srcs, run_dsts, run_lens)
        except Exception as e:  # noqa: BLE001 - the contract allows only TransferError
            raise TransferError(f"Mooncake write to {peer.address} failed: {e}") from e
        finally:
            with self._lock:
                self._num_in_flight -= 1
                if self._is_closing and self._num_in_flight == 0:  # close() came while this write ran
                    self._teardown()
        if code != 0:
            raise TransferError(
                f"Mooncake write of {len(srcs)} chunks to {peer.address} failed (code {code}): "
                "the peer exited, is unreachable, or refused the addresses (see Mooncake's log)"
            )
        return len(srcs) * self.chunk_nbytes

    def _addresses(
        self, peer: KVRegion, layers: Sequence[int], src_block_ids: Sequence[int], dst_block_ids: Sequence[int]
    ) -> tuple[list[int], list[int]]:
        """Per-chunk source and destination addresses, ordered by (layer, K|V, destination block)."""
        pairs = sorted(zip(dst_block_ids, src_block_ids))
        srcs: list[int] = []
        dsts: list[int] = []
        for layer in layers:
            for kv in (0, 1):
                for dst, src in pairs:
                    srcs.append(self._base + chunk_offset(layer, kv, src, self.num_blocks, self.chunk_nbytes))
                    dsts.append(peer.base + chunk_offset(layer, kv, dst, peer.num_blocks, peer.chunk_nbytes))
        return srcs, dsts

    def close(self) -> None:
        """Unregister the cache and drop the engine; a write in flight finishes the teardown when it returns
        (a hung peer holds it for up to Mooncake's 30 s), so close() never waits on the network."""
        with self._lock:
            self._is_closing = True
            if self._num_in_flight == 0:
                self._teardown()

    def _teardown(self) -> None:
        # NOTE: _lock held and no write in flight; nothing calls into the engine after this
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.unregister_memory(self._base)
