"""Small host -> device copies that do not stall the host."""

from __future__ import annotations

import torch


def to_device(values: list[float] | list[int], device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small tensor of per-row values on `device`. On CUDA it goes through pinned memory without blocking:
    torch.tensor(list, device="cuda") copies from pageable memory and waits for the stream, that is for the
    forward still queued before it."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
