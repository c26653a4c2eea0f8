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


def _receiver(conn) -> None:  # type: ignore[no-untyped-def]
    """Another process: a zeroed 'KV cache' on the GPU, exported; reports its contents when told."""
    from pdserve.disagg.transfer.cuda_ipc import CudaIpcEngine

    cache = torch.zeros(SHAPE, dtype=torch.bfloat16, device="cuda")
    engine = CudaIpcEngine(cache, receive=True)
    region = engine.region()
    assert region is not None
    conn.send(region.address)  # text, as it travels inside KVDest
    conn.recv()
    conn.send(cache.float().cpu().numpy())
    conn.recv()


def test_cuda_ipc_writes_blocks_into_another_process() -> None:
    from pdserve.disagg.transfer.cuda_ipc import CudaIpcEngine
    from pdserve.messages import KVRegion

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver, args=(child,))
    proc.start()
    try:
        handle = parent.recv()
        src = torch.randn(SHAPE, device="cuda").to(torch.bfloat16)
        sender = CudaIpcEngine(src, receive=False)
        assert sender.region() is None
        peer = KVRegion(engine="cuda_ipc", hostname="h", address=handle, base=0, num_layers=SHAPE[0],
                        num_blocks=SHAPE[2], chunk_nbytes=sender.chunk_nbytes)
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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pd_on_cuda_over_cuda_ipc_equals_mixed(dtype: str) -> None:
    common = dict(model="tiny", load_format="dummy", max_model_len=512, num_blocks=96, device="cuda", dtype=dtype)
    mixed = EngineCore(make_engine_config(**common))  # type: ignore[arg-type]
    p = EngineCore(make_engine_config(**common, max_num_batched_tokens=48,  # type: ignore[arg-type]
                                      disagg=DisaggConfig(role="prefill", transfer_engine="cuda_ipc")))
    d = EngineCore(make_engine_config(**common,  # type: ignore[arg-type]
                                      disagg=DisaggConfig(role="decode", transfer_engine="cuda_ipc")))
    try:
        assert list(d.executor.regions[0][0].engine for _ in [0]) == ["cuda_ipc"]
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
