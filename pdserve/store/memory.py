"""An in-process dict backend, for tests and single-process experiments.

Objects live in this process only: another instance (or another TP rank's
process) sees none of them.
"""

from __future__ import annotations

import torch

from pdserve.store.base import KVStore, StoreError


class MemoryStore(KVStore):
    def __init__(self, capacity: int | str | None = None) -> None:
        from pdserve.config import parse_size

        self.capacity = parse_size(capacity) if capacity is not None else None
        self._objects: dict[str, bytes] = {}
        self._num_bytes = 0

    def register_buffer(self, buffer: torch.Tensor) -> None:
        if buffer.device.type != "cpu" or not buffer.is_contiguous():
            raise StoreError("the registered buffer must be a contiguous CPU tensor")

    def exists(self, keys: list[str]) -> list[bool]:
        return [key in self._objects for key in keys]

    def put(self, keys: list[str], blocks: list[torch.Tensor]) -> list[bool]:
        results = []
        for key, block in zip(keys, blocks):
            if key in self._objects:
                results.append(True)
                continue
            data = block.contiguous().view(torch.uint8).numpy().tobytes()
            if self.capacity is not None and self._num_bytes + len(data) > self.capacity:
                results.append(False)
                continue
            self._objects[key] = data
            self._num_bytes += len(data)
            results.append(True)
        return results

    def get(self, keys: list[str], blocks: list[torch.Tensor]) -> list[bool]:
        results = []
        for key, block in zip(keys, blocks):
            data = self._objects.get(key)
            if data is None or len(data) != block.numel() * block.element_size():
                results.append(False)
                continue
            block.view(torch.uint8).view(-1).copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            results.append(True)
        return results
