"""The swap ops between the device layout and the block-major host layout, against a per-block loop."""

from __future__ import annotations

import pytest
import torch

from pdserve.worker.kv_tiers import _host_runs, swap_in, swap_out

SHAPE = (3, 2, 12, 4, 2, 8)  # layers, K|V, blocks, block size, KV heads, head dim


def host_for(cache: torch.Tensor, num_blocks: int) -> torch.Tensor:
    layers, _, _, bs, heads, dim = cache.shape
    return torch.full((num_blocks, layers, 2, bs, heads, dim), -1.0, dtype=cache.dtype)


def test_host_runs() -> None:
    assert _host_runs([]) == []
    assert _host_runs([4, 5, 6, 1, 2, 9]) == [(0, 4, 3), (3, 1, 2), (5, 9, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device_ids, host_ids", [([0], [0]), ([3, 1, 7, 2], [5, 6, 7, 0]), ([11, 10, 9], [2, 4, 3])])
def test_swap_out_then_in_round_trips(dtype: torch.dtype, device_ids: list[int], host_ids: list[int]) -> None:
    cache = torch.randn(SHAPE).to(dtype)
    host = host_for(cache, 8)
    swap_out(cache, host, device_ids, host_ids)
    for d, h in zip(device_ids, host_ids):
        assert torch.equal(host[h], cache[:, :, d])  # block-major: one host block holds every layer of a block
    untouched = [h for h in range(8) if h not in host_ids]
    assert bool((host[untouched] == -1).all())
    target = torch.zeros_like(cache)
    new_ids = [(d + 5) % SHAPE[2] for d in device_ids]
    swap_in(target, host, host_ids, new_ids)
    for d, n in zip(device_ids, new_ids):
        assert torch.equal(target[:, :, n], cache[:, :, d])
    others = [b for b in range(SHAPE[2]) if b not in new_ids]
    assert bool((target[:, :, others] == 0).all())
