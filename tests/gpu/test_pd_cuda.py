"""PD on the GPU: the cuda_ipc transfer engine between processes, and a P/D pair of engine cores on CUDA
equal to the mixed path token for token."""

from __future__ import annotations

import multiprocessing as mp
import random
import sys
from pathlib import Path

import pytest
import torch

from pdserve.config import DisaggConfig, make_engine_config
from pdserve.engine.core import EngineCore

sys.path.insert(0, str(Path(__file__).parents[1] / "e2e"))
from test_pd_engine import run_mixed, run_pd  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SHAPE = (3, 2, 40, 16, 2, 64)  # layers, K|V, blocks, block size, KV heads, head dim


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


def _receiver(conn, device: str = "cuda") -> None:  # type: ignore[no-untyped-def]
    """Another process: a zeroed 'KV cache' on the GPU, exported; reports its contents when told."""
    from pdserve.disagg.transfer.cuda_ipc import CudaIpcEngine

    cache = torch.zeros(SHAPE, dtype=torch.bfloat16, device=device)
    engine = CudaIpcEngine(cache, receive=True)
    region = engine.region()
    assert region is not None
    conn.send(region.address)  # text, as it travels inside KVDest
    conn.recv()
    conn.send(cache.float().cpu().numpy())
    conn.recv()


@pytest.mark.parametrize("receiver_device", ["cuda:0", pytest.param("cuda:1", marks=two_gpus)])
def test_cuda_ipc_writes_blocks_into_another_process(receiver_device: str) -> None:
    """Contiguous runs (2-D memcpys), one block, and 12 scattered runs (gather/scatter; staged across GPUs)."""
    from pdserve.disagg.transfer.cuda_ipc import CudaIpcEngine
    from pdserve.messages import KVRegion

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver, args=(child, receiver_device))
    proc.start()
    try:
        handle = parent.recv()
        src = torch.randn(SHAPE, device="cuda").to(torch.bfloat16)
        sender = CudaIpcEngine(src, receive=False)
        assert sender.region() is None
        peer = KVRegion(
            engine="cuda_ipc",
            hostname="h",
            address=handle,
            base=0,
            num_layers=SHAPE[0],
            num_blocks=SHAPE[2],
            chunk_nbytes=sender.chunk_nbytes,
        )
        scattered_src = list(range(20, 32))
        scattered_dst = [39, 10, 33, 12, 35, 14, 37, 16, 31, 18, 29, 8]  # 12 runs: the gather/scatter path
        writes = [([0, 2], [1, 2, 3, 7], [5, 6, 7, 0]), ([1], [4], [9]), ([0, 1, 2], scattered_src, scattered_dst)]
        written = sum(sender.write(peer, layers, s, d) for layers, s, d in writes)
        sender.flush()
        assert written == sum(2 * len(layers) * len(s) for layers, s, _ in writes) * sender.chunk_nbytes
        parent.send("report")
        got = torch.from_numpy(parent.recv())
        want = torch.zeros(SHAPE)
        for layers, s_ids, d_ids in writes:
            for layer in layers:
                for s_id, d_id in zip(s_ids, d_ids):
                    want[layer, :, d_id] = src[layer, :, s_id].float().cpu()
        assert torch.equal(got, want)
        parent.send("done")
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0


def test_copy_runs_matches_slice_copies() -> None:
    """The 2-D memcpy path of cuda_copy against plain slice copies, over layer spans with gaps."""
    from pdserve.disagg.transfer.cuda_copy import copy_runs, cudart, layer_spans

    assert cudart() is not None  # torch's runtime is found: the 2-D path is the one tested
    assert layer_spans([0, 1, 2, 5, 7, 8]) == [(0, 3), (5, 1), (7, 2)]
    src = torch.randn(6, 2, 30, 16, 2, 64, device="cuda").to(torch.bfloat16)
    dst = torch.zeros(6, 2, 50, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
    want = dst.clone()
    layers, runs = [0, 1, 2, 4], [(0, 10, 5), (7, 3, 1), (20, 40, 10)]
    assert copy_runs(dst, src, layers, runs) == 2 * len(runs)  # two layer spans, one call per run each
    for layer in layers:
        for s0, d0, n in runs:
            want[layer, :, d0 : d0 + n] = src[layer, :, s0 : s0 + n]
    torch.cuda.synchronize()
    assert torch.equal(dst, want)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("gpus", [(0, 0), pytest.param((0, 1), marks=two_gpus)])
def test_pd_on_cuda_over_cuda_ipc_equals_mixed(dtype: str, gpus: tuple[int, int]) -> None:
    """P on gpus[0], D on gpus[1] (one engine process: the handle resolves to the tensor, copies cross GPUs)."""
    common = dict(model="tiny", load_format="dummy", max_model_len=512, num_blocks=96, device="cuda", dtype=dtype)
    mixed = EngineCore(make_engine_config(**common))  # type: ignore[arg-type]
    p = EngineCore(
        make_engine_config(
            **common,
            max_num_batched_tokens=48,
            gpu_ids=(gpus[0],),  # type: ignore[arg-type]
            disagg=DisaggConfig(role="prefill", transfer_engine="cuda_ipc"),
        )
    )
    d = EngineCore(
        make_engine_config(
            **common,
            gpu_ids=(gpus[1],),  # type: ignore[arg-type]
            disagg=DisaggConfig(role="decode", transfer_engine="cuda_ipc"),
        )
    )
    try:
        assert list(d.executor.regions[0][0].engine for _ in [0]) == ["cuda_ipc"]
        assert d.executor.runner.kv_cache.device == torch.device("cuda", gpus[1])
        rng = random.Random(0)
        prompts = [[rng.randrange(1, 400) for _ in range(n)] for n in (1, 15, 16, 17, 100, 47, 130)]
        assert run_pd(p, d, prompts) == run_mixed(mixed, prompts)
        assert p.stats().kv_transfer.bytes_sent > 0 and not p.stats().kv_transfer.failures
        for core in (p, d):
            core.step()
            core.check_integrity()
            assert core.kv.num_free_blocks == core.kv.num_blocks
    finally:
        for core in (mixed, p, d):
            core.shutdown()
