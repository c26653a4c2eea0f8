"""Block-run copies between two KV caches on CUDA devices, with as few calls as the layout allows.

A cache is [num_layers, 2, num_blocks, *chunk]: seen as rows of (layer, K|V), every row num_blocks
chunks long, a run of consecutive blocks over consecutive layers is a 2-D region: one
cudaMemcpy2DAsync moves it (the rows of every layer of a run in one call), where torch would need a
copy per (layer, K|V) row, each a separate launch from Python. The CUDA runtime is the one torch
loaded (found in /proc/self/maps); without it, or where a row is longer than the runtime's largest
pitch, the copies fall back to one torch copy per row. (cuda_ipc uses it on one GPU; between two GPUs
it stages through plain memory on D's GPU instead.) Copies go on the caller's current stream of
`src`'s device; pointers of another device (a peer opened through CUDA IPC) are resolved by
unified addressing.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)

MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: the direction from unified addressing
MAX_PITCH = 2**31 - 1  # cudaDevAttrMaxPitch on every GPU since Kepler


@functools.cache
def cudart() -> ctypes.CDLL | None:
    """The CUDA runtime library torch uses, or None where it is linked in statically."""
    torch.cuda.init()
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libcudart.so" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
            fn = lib.cudaMemcpy2DAsync
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_int
        fn.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_size_t,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_void_p,
        ]
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        lib.cudaGetErrorString.argtypes = [ctypes.c_int]
        return lib
    logger.info("no dynamically loaded CUDA runtime found: KV block copies go one (layer, K|V) row at a time")
    return None


def layer_spans(layers: Sequence[int]) -> list[tuple[int, int]]:
    """[(first, count)] of consecutive layer ids, in order."""
    spans: list[tuple[int, int]] = []
    for layer in layers:
        if spans and spans[-1][0] + spans[-1][1] == layer:
            spans[-1] = (spans[-1][0], spans[-1][1] + 1)
        else:
            spans.append((layer, 1))
    return spans


def copy_runs(dst: torch.Tensor, src: torch.Tensor, layers: Sequence[int], runs: Sequence[tuple[int, int, int]]) -> int:
    """Copy blocks src[layer, :, s0:s0+n] -> dst[layer, :, d0:d0+n] for every layer and (s0, d0, n) run, on the
    current stream; the number of copy calls made. Both caches are contiguous with the same chunk shape."""
    chunk = src[0, 0, 0].numel() * src.element_size()
    spitch, dpitch = src.shape[2] * chunk, dst.shape[2] * chunk
    lib = cudart()
    if lib is None or max(spitch, dpitch) > MAX_PITCH:
        for layer in layers:
            for kv in (0, 1):
                for s0, d0, n in runs:
                    dst[layer, kv, d0 : d0 + n].copy_(src[layer, kv, s0 : s0 + n], non_blocking=True)
        return len(layers) * 2 * len(runs)
    stream = torch.cuda.current_stream(src.device).cuda_stream
    calls = 0
    for first, count in layer_spans(layers):
        src_row, dst_row = src.data_ptr() + 2 * first * spitch, dst.data_ptr() + 2 * first * dpitch
        for s0, d0, n in runs:
            err = lib.cudaMemcpy2DAsync(
                dst_row + d0 * chunk, dpitch, src_row + s0 * chunk, spitch, n * chunk, 2 * count, MEMCPY_DEFAULT, stream
            )
            if err:
                raise RuntimeError(f"cudaMemcpy2DAsync failed: {lib.cudaGetErrorString(err).decode()} ({err})")
            calls += 1
    return calls
