"""The tensor-parallel group of this process: rank, size and the two collectives layers use.

With tp_size == 1 every collective is the identity, so no process group is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class TPGroup:
    rank: int = 0
    size: int = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
            # gloo sums low-precision floats poorly; reduce in fp32
            y = x.float()
            dist.all_reduce(y)
            return y.to(x.dtype)
        dist.all_reduce(x)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on each rank -> [..., n * size], rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)


_group = TPGroup()


def get_tp_group() -> TPGroup:
    return _group


def init_tp_group(rank: int, size: int, backend: str, init_method: str) -> TPGroup:
    """Join the process group of all TP ranks of one instance (blocking until all joined)."""
    global _group
    if size > 1:
        dist.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=size)
    _group = TPGroup(rank=rank, size=size)
    return _group
