"""Same-host GPU transfers through CUDA IPC: P's ranks copy blocks straight into D's GPU KV cache.

D exports its cache's memory once (a CUDA IPC handle, sent as hex text inside the KVRegion, never
pickled); P opens it once per peer and copies whole (layer, K|V, block run) slices device to device
(over NVLink between GPUs, in place on one GPU) on a side stream of its own, ordered on the device after
the event recorded when the layer wrote its KV (no host wait per layer). `flush`, at the end of the
step, waits for the copies. Blocks scattered over many runs go through a gather and a scatter kernel
per layer when P and D share the GPU; between two GPUs each run is still its own copy (NOTE: a
scattered prompt then costs a copy per block and layer; a staging buffer on D's GPU would fix it). A handle from this very process (P and D in one process, as in
tests) is resolved to the tensor itself: CUDA cannot open its own IPC handles.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch

from pdserve.disagg.transfer.base import PeerMappings, TransferEngine, TransferError, check_peer, hostname
from pdserve.disagg.transfer.shm import _block_runs
from pdserve.messages import KVRegion

MAX_MEMCPY_RUNS = 8  # more runs of consecutive blocks than this: gather + scatter kernels (one GPU)
_EXPORTED: dict[str, torch.Tensor] = {}  # this process's exported caches, by handle text


def export_handle(tensor: torch.Tensor) -> str:
    """The IPC handle of the memory under `tensor` (which must start its storage), as JSON text."""
    if tensor.storage_offset() != 0 or not tensor.is_contiguous():
        raise ValueError("only a whole contiguous tensor can be exported")
    fields = tensor.untyped_storage()._share_cuda_()  # type: ignore[attr-defined]
    encoded = [f.hex() if isinstance(f, bytes) else f for f in fields]
    return json.dumps({"pid": os.getpid(), "fields": encoded, "kinds": [type(f).__name__ for f in fields]})


def open_handle(text: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """The tensor of `shape` over memory exported by export_handle (in another process)."""
    local = _EXPORTED.get(text)
    if local is not None:
        return local
    info = json.loads(text)
    fields = [bytes.fromhex(f) if kind == "bytes" else f for f, kind in zip(info["fields"], info["kinds"])]
    storage = torch.UntypedStorage._new_shared_cuda(*fields)  # type: ignore[attr-defined]
    strides: list[int] = []
    step = 1
    for size in reversed(shape):
        strides.insert(0, step)
        step *= size
    return torch.empty(0, dtype=dtype, device=storage.device).set_(storage, 0, tuple(shape), tuple(strides))


class CudaIpcEngine(TransferEngine):
    name = "cuda_ipc"
    waits_on_device = True

    def __init__(self, kv_cache: torch.Tensor, receive: bool) -> None:
        super().__init__(kv_cache)
        if kv_cache.device.type != "cuda":
            raise TransferError("cuda_ipc needs the KV cache on a CUDA device")
        self.handle: str | None = None
        if receive:
            self.handle = export_handle(kv_cache)
            _EXPORTED[self.handle] = kv_cache
        self._stream = torch.cuda.Stream(device=kv_cache.device)
        self._peers = PeerMappings()

    def region(self) -> KVRegion | None:
        if self.handle is None:
            return None
        return KVRegion(engine="cuda_ipc", hostname=hostname(), address=self.handle, base=0,
                        num_layers=self.num_layers, num_blocks=self.num_blocks, chunk_nbytes=self.chunk_nbytes)

    def _map(self, peer: KVRegion) -> torch.Tensor:
        def open_peer() -> torch.Tensor:
            shape = (peer.num_layers, 2, peer.num_blocks, *self.kv_cache.shape[3:])
            try:
                with torch.cuda.device(self.kv_cache.device):
                    return open_handle(peer.address, shape, self.kv_cache.dtype)
            except (RuntimeError, ValueError, KeyError) as e:
                raise TransferError(f"cannot open the peer's CUDA IPC handle (did the peer exit?): {e}") from e

        return self._peers.get(peer.address, open_peer)

    def write(self, peer: KVRegion, layers: Sequence[int], src_block_ids: Sequence[int],
              dst_block_ids: Sequence[int]) -> int:
        check_peer(self, peer, dst_block_ids)
        dst = self._map(peer)
        try:
            with torch.cuda.device(self.kv_cache.device), torch.cuda.stream(self._stream):
                runs = _block_runs(src_block_ids, dst_block_ids)
                if len(runs) > MAX_MEMCPY_RUNS and dst.device == self.kv_cache.device:
                    # scattered blocks (one GPU): a gather and a scatter kernel per layer, not a copy per block
                    src_index = torch.tensor(src_block_ids, device=dst.device)
                    dst_index = torch.tensor(dst_block_ids, device=dst.device)
                    for layer in layers:
                        dst[layer].index_copy_(1, dst_index, self.kv_cache[layer].index_select(1, src_index))
                else:
                    # contiguous (layer, K|V, block run) slices: each copy is one device memcpy, several times
                    # faster than a strided copy kernel over [layers, 2, blocks]
                    for layer in layers:
                        for kv in (0, 1):
                            for s0, d0, n in runs:
                                dst[layer, kv, d0:d0 + n].copy_(self.kv_cache[layer, kv, s0:s0 + n],
                                                                non_blocking=True)
        except RuntimeError as e:
            self._peers.forget(peer.address)
            raise TransferError(f"CUDA IPC copy to the peer failed: {e}") from e
        return len(layers) * 2 * len(src_block_ids) * self.chunk_nbytes

    def wait(self, event: torch.cuda.Event) -> None:
        self._stream.wait_event(event)

    def flush(self) -> None:
        try:
            self._stream.synchronize()
        except RuntimeError as e:
            self._peers.forget()
            raise TransferError(f"CUDA IPC copy to the peer failed: {e}") from e

    def close(self) -> None:
        self._peers.forget()
        if self.handle is not None:
            _EXPORTED.pop(self.handle, None)
