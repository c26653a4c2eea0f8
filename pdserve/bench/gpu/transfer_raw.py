"""`pdserve bench gpu`'s raw transfer: the cuda_ipc engine writing one prompt's KV blocks into a cache that a
spawned child process exported on D's GPU, against a peer copy of the same bytes between the two GPUs."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from pdserve.bench.gpu.common import num_blocks_for, ratio_of, rounded, timing_stats
from pdserve.bench.gpu.config import CHILD_REPLY_TIMEOUT_S, CHILD_START_TIMEOUT_S, GpuBenchConfig
from pdserve.bench.gpu.device import sync
from pdserve.piped_child import PipedChild


def _ipc_receiver(conn: Connection, shape: tuple[int, ...], dtype_name: str, device: str) -> None:
    """Child process: a zeroed cache of `shape` on the GPU, exported through cuda_ipc; answers JSON commands
    {"cmd": "zero"}, {"cmd": "checksum", "num_blocks": n} (sum of the bytes of blocks [0, n) of every layer),
    {"cmd": "stop"}."""
    engine = None
    try:
        import torch

        from pdserve.disagg.transfer.cuda_ipc import CudaIpcEngine

        torch.cuda.set_device(device)
        cache = torch.zeros(shape, dtype=getattr(torch, dtype_name), device=device)
        engine = CudaIpcEngine(cache, receive=True)
        region = engine.region()
        assert region is not None
        conn.send_bytes(json.dumps({"address": region.address}).encode())
        while True:
            message = json.loads(conn.recv_bytes())
            if message["cmd"] == "stop":
                break
            if message["cmd"] == "zero":
                cache.zero_()
                torch.cuda.synchronize()
                conn.send_bytes(b"{}")
            elif message["cmd"] == "checksum":
                total = cache[:, :, : message["num_blocks"]].view(torch.uint8).sum(dtype=torch.int64)
                conn.send_bytes(json.dumps({"checksum": int(total)}).encode())
    except (EOFError, OSError):
        pass  # the parent went away
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises
        try:
            conn.send_bytes(json.dumps({"error": f"{type(e).__name__}: {e}"}).encode())
        except OSError:
            pass
    finally:
        if engine is not None:
            engine.close()


class _Child:
    """The spawned receiver process and its pipe (JSON messages)."""

    def __init__(self, shape: tuple[int, ...], dtype_name: str, device: str) -> None:
        self.child = PipedChild(
            _ipc_receiver, (shape, dtype_name, device), "pdserve-bench-gpu-receiver", "the receiver process"
        )

    def recv(self, timeout: float) -> dict[str, Any]:
        reply = json.loads(self.child.recv(timeout))
        if "error" in reply:
            raise RuntimeError(f"the receiver process failed: {reply['error']}")
        return reply

    def ask(self, **message: Any) -> dict[str, Any]:
        self.child.send(json.dumps(message).encode())
        return self.recv(CHILD_REPLY_TIMEOUT_S)

    def close(self) -> None:
        self.child.close(json.dumps({"cmd": "stop"}).encode(), 15.0)


def _timed(fn: Callable[[], None], device: str, repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


def run_transfer_raw(config: GpuBenchConfig, arch: Any, lens: list[int], gpus: tuple[int, int]) -> list[dict[str, Any]]:
    """cuda_ipc into another process (on D's GPU) vs a contiguous copy of the same bytes from P's GPU to D's
    (a peer copy between two GPUs), per prompt length."""
    import torch

    from pdserve.disagg.transfer.base import hostname
    from pdserve.disagg.transfer.cuda_ipc import CudaIpcEngine
    from pdserve.messages import KVRegion
    from pdserve.worker.model_runner import TORCH_DTYPES

    bs = config.block_size
    max_blocks = num_blocks_for(max(lens), bs)
    shape = (arch.num_layers, 2, max_blocks, bs, arch.num_kv_heads, arch.head_dim)
    d_shape = (arch.num_layers, 2, 2 * max_blocks, *shape[3:])  # room for every other block (the scattered case)
    p_gpu, d_gpu = gpus
    child = _Child(d_shape, config.dtype, f"cuda:{d_gpu}")
    rows = []
    try:
        address = child.recv(CHILD_START_TIMEOUT_S)["address"]
        generator = torch.Generator(device=f"cuda:{p_gpu}").manual_seed(config.seed)
        src = torch.randn(shape, device=f"cuda:{p_gpu}", generator=generator).to(TORCH_DTYPES[config.dtype])
        engine = CudaIpcEngine(src, receive=False)
        peer = KVRegion(
            engine="cuda_ipc",
            hostname=hostname(),
            address=address,
            base=0,
            num_layers=arch.num_layers,
            num_blocks=2 * max_blocks,
            chunk_nbytes=engine.chunk_nbytes,
        )
        layers = list(range(arch.num_layers))
        try:
            for tokens in lens:
                rows.append(_raw_length(engine, peer, child, src, layers, tokens, config))
                row = rows[-1]
                print(
                    f"[gpu] raw cuda_ipc {tokens} tokens ({row['nbytes'] / 2**20:.0f} MiB): all layers "
                    f"{row['ipc_all_layers']['gb_per_s_median']:.0f} GB/s, layer by layer "
                    f"{row['ipc_layer_by_layer']['gb_per_s_median']:.0f} GB/s, device copy "
                    f"{row['device_copy']['gb_per_s_median']:.0f} GB/s (GPU {p_gpu} -> {d_gpu})",
                    flush=True,
                )
        finally:
            engine.close()
    finally:
        child.close()
    return rows


def _checked_write(
    engine: Any, peer: Any, child: _Child, src: Any, layers: list[int], ids: list[int], tokens: int
) -> int:
    """Write blocks `ids` of every layer into the zeroed peer (which maps its memory: untimed) and check that the
    bytes landed; the bytes written."""
    import torch

    child.ask(cmd="zero")
    nbytes = engine.write(peer, layers, ids, ids)
    engine.flush()
    want = int(src[:, :, : len(ids)].view(torch.uint8).sum(dtype=torch.int64))
    got = child.ask(cmd="checksum", num_blocks=len(ids))["checksum"]
    if got != want:
        raise RuntimeError(
            f"the cuda_ipc copy of {tokens} tokens' KV did not land: the receiver's checksum is "
            f"{got}, the sender's {want}"
        )
    return int(nbytes)


def _raw_length(
    engine: Any, peer: Any, child: _Child, src: Any, layers: list[int], tokens: int, config: GpuBenchConfig
) -> dict[str, Any]:
    """One prompt length's raw figures: its blocks through cuda_ipc (all layers, layer by layer) and a
    contiguous device copy of the same bytes."""
    import torch

    num_blocks = num_blocks_for(tokens, config.block_size)
    ids = list(range(num_blocks))
    scattered_ids = [2 * i for i in range(num_blocks)] if 2 * num_blocks <= peer.num_blocks else ids
    nbytes = _checked_write(engine, peer, child, src, layers, ids, tokens)

    def all_layers() -> None:
        engine.write(peer, layers, ids, ids)
        engine.flush()

    def scattered() -> None:  # every other block of D's: the gather / (peer copy) / scatter path
        engine.write(peer, layers, ids, scattered_ids)
        engine.flush()

    def layer_by_layer() -> None:
        for layer in layers:
            engine.write(peer, [layer], ids, ids)
        engine.flush()

    dst_device = engine.peer_device(peer)
    flat_src = torch.empty(nbytes, dtype=torch.uint8, device=src.device).fill_(3)
    flat_dst = torch.empty(nbytes, dtype=torch.uint8, device=dst_device)
    local = torch.empty(src.shape, dtype=src.dtype, device=dst_device)

    def device_copy() -> None:  # one contiguous copy of the same bytes, P's GPU -> D's GPU
        flat_dst.copy_(flat_src)
        sync("cuda")

    def local_slices() -> None:  # the (layer, K|V) slice copies, into this process's own memory on D's GPU
        for layer in layers:
            for kv in (0, 1):
                local[layer, kv, :num_blocks].copy_(src[layer, kv, :num_blocks])
        sync("cuda")

    row: dict[str, Any] = {
        "tokens": tokens,
        "num_blocks": num_blocks,
        "nbytes": nbytes,
        "copies_per_write": 2 * len(layers),
    }
    for name, fn in (
        ("ipc_all_layers", all_layers),
        ("ipc_layer_by_layer", layer_by_layer),
        ("ipc_scattered", scattered),
        ("device_copy", device_copy),
        ("local_slices", local_slices),
    ):
        fn()  # warm-up
        t = timing_stats(_timed(fn, "cuda", config.raw_repeats))
        row[name] = t | {
            "gb_per_s_best": rounded(nbytes / t["seconds_best"] / 1e9, 2),
            "gb_per_s_median": rounded(nbytes / t["seconds_median"] / 1e9, 2),
        }
    copy = row["device_copy"]["gb_per_s_median"]
    row["all_layers_over_copy"] = ratio_of(row["ipc_all_layers"]["gb_per_s_median"], copy)
    row["layer_by_layer_over_copy"] = ratio_of(row["ipc_layer_by_layer"]["gb_per_s_median"], copy)
    row["scattered_over_copy"] = ratio_of(row["ipc_scattered"]["gb_per_s_median"], copy)
    return row
