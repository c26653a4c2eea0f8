"""The Triton paged attention backend against the torch reference backend, on the GPU.

Tolerances (max absolute difference of the outputs, inputs ~N(0, 1)): float32 1e-4 (both compute in
IEEE fp32; the difference is summation order), bfloat16 2e-2 (bf16 inputs and outputs, fp32
accumulation in both, but the reference's SDPA and the kernel round intermediate probabilities
differently). Cases: prefill, extend over a cached prefix, decode, a mixed batch, GQA groups 1/4/8,
head sizes 64/128, block sizes 16/32, and decode over long contexts (split-K).
"""

from __future__ import annotations

import random

import pytest
import torch

from pdserve.layers.attention.base import BatchLayout
from pdserve.layers.attention.torch_ref import TorchAttention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def run_both(
    q_lens: list[int],
    seq_lens: list[int],
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    from pdserve.layers.attention.triton_paged import TritonAttention

    rng = random.Random(seed)
    torch.manual_seed(seed)
    num_blocks = sum(-(-s // block_size) + 1 for s in seq_lens) + 8
    free = list(range(num_blocks))
    rng.shuffle(free)  # scattered blocks
    tables, slots = [], []
    for q_len, seq_len in zip(q_lens, seq_lens):
        table = [free.pop() for _ in range(-(-seq_len // block_size) + 1)]
        tables.append(table)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(seq_len - q_len, seq_len)]
    layout = BatchLayout(q_lens, seq_lens, tables, torch.tensor(slots), block_size)
    n = sum(q_lens)
    device = torch.device("cuda")
    q = torch.randn(n, heads, head_dim, dtype=dtype, device=device)
    k = torch.randn(n, kv_heads, head_dim, dtype=dtype, device=device)
    v = torch.randn(n, kv_heads, head_dim, dtype=dtype, device=device)
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device)
    outs = []
    splits = 1
    for backend_type in (TorchAttention, TritonAttention):
        backend = backend_type(heads, kv_heads, head_dim, head_dim**-0.5)
        c = cache.clone()
        meta = backend.prepare(layout, device)
        splits = getattr(meta, "num_splits", splits)
        outs.append(backend.forward(q, k, v, c, meta).float())
    return outs[0], outs[1], splits


CASES = {
    "prefill": ([37], [37]),
    "prefill-2": ([16, 100], [16, 100]),
    "extend": ([7, 33], [50, 90]),
    "decode": ([1] * 5, [1, 15, 16, 17, 300]),
    "mixed": ([1, 20, 1, 64], [40, 20, 129, 200]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(8, 8, 64), (32, 8, 128), (16, 2, 64)])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_the_torch_backend(
    case: str, block_size: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype
) -> None:
    q_lens, seq_lens = CASES[case]
    ref, got, _ = run_both(q_lens, seq_lens, heads, kv_heads, head_dim, block_size, dtype)
    assert torch.isfinite(got).all()
    assert (ref - got).abs().max().item() < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("seq_lens", [[4000], [8191, 17, 2048], [16384, 16384]])
def test_long_context_decode_splits_and_matches(seq_lens: list[int], dtype: torch.dtype) -> None:
    ref, got, splits = run_both([1] * len(seq_lens), seq_lens, 32, 8, 128, 16, dtype)
    assert splits > 1  # few sequences, long contexts: the KV range is split
    assert (ref - got).abs().max().item() < TOLERANCE[dtype]


def test_the_engine_picks_triton_on_cuda() -> None:
    from pdserve.config import ParallelConfig

    assert ParallelConfig(device="cuda").resolved_attention_backend() == "triton"
    assert ParallelConfig(device="cuda", attention_backend="torch").resolved_attention_backend() == "torch"
