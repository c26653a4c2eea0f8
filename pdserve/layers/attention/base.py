"""The attention backend contract.

A step's batch is flat: tokens of all scheduled sequences concatenated. Each
sequence i contributes q_lens[i] query tokens at positions
[seq_lens[i] - q_lens[i], seq_lens[i]) and attends causally to all of its
seq_lens[i] tokens, whose K/V live in its blocks (block_tables[i]).

KV cache of one layer: [2, num_blocks, block_size, num_kv_heads, head_dim]
(K at index 0, V at 1), a view into the rank's one allocation
[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim].
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class BatchLayout:
    """Per-step batch description, built on the CPU from the step plan."""

    q_lens: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]
    slot_mapping: torch.Tensor  # [num_tokens] int64: block_id * block_size + offset
    block_size: int


class AttentionBackend(ABC):
    """Computes attention over the paged KV cache.

    `prepare` runs once per step (before the first layer) and returns whatever
    the backend needs per layer; it must not sync with the device beyond
    copying host data to it. `forward` writes this step's K/V into the cache
    at `slot_mapping` (mutating `kv_cache`) and returns the attention output.
    Neither may block on other processes.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.fused_write = False  # set by the model on CUDA with Triton (layers.fused.write_kv)

    def write_kv(
        self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's K/V at their slots (one index_copy_ each, or one Triton kernel for both where
        `fused_write` is set); returns the K and V caches, [num_blocks, block_size, kv_heads, head_dim]."""
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        if self.fused_write:
            from pdserve.layers.fused import write_kv

            write_kv(k, v, kv_cache, slot_mapping)
            return k_cache, v_cache
        k_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, slot_mapping, k)
        v_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, slot_mapping, v)
        return k_cache, v_cache

    @abstractmethod
    def prepare(self, layout: BatchLayout, device: torch.device) -> Any:
        """Build per-step metadata shared by all layers."""

    @abstractmethod
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, metadata: Any
    ) -> torch.Tensor:
        """q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim].

        Returns [num_tokens, num_heads * head_dim].
        """


def get_backend(name: str, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> AttentionBackend:
    if name == "torch":
        from pdserve.layers.attention.torch_ref import TorchAttention

        return TorchAttention(num_heads, num_kv_heads, head_dim, scale)
    if name == "triton":
        from pdserve.layers.attention.triton_paged import TritonAttention

        return TritonAttention(num_heads, num_kv_heads, head_dim, scale)
    raise ValueError(f"attention backend {name!r} is not known (available: torch, triton)")
