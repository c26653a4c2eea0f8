"""The pool backend contract and the factory that opens one from config."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

STORE_KINDS = ("mooncake", "file", "memory")


class StoreError(RuntimeError):
    """A whole call failed (connection lost, timeout, bad config); the caller counts it as a miss."""


class KVStore(ABC):
    """A key -> bytes object store used as the KV pool tier.

    Contract, for every backend:
    - `register_buffer` is called once, before any put/get, with the host buffer
      (a contiguous CPU tensor) that every later block view lies in. Backends that
      need registered memory (Mooncake) register it here, once.
    - `put`/`get` take parallel lists of keys and block views (contiguous tensors
      inside the registered buffer). They block until done or until the backend's
      timeout, and return one bool per key: True when that object was written /
      read completely. A False for `get` leaves that view's contents undefined.
    - `exists` returns one bool per key.
    - Any method may raise StoreError when the whole call failed; no other
      exception type escapes a backend.
    - Objects are immutable: putting an existing key again is allowed and may be
      skipped by the backend.
    """

    @abstractmethod
    def register_buffer(self, buffer: torch.Tensor) -> None: ...

    @abstractmethod
    def exists(self, keys: list[str]) -> list[bool]: ...

    @abstractmethod
    def put(self, keys: list[str], blocks: list[torch.Tensor]) -> list[bool]: ...

    @abstractmethod
    def get(self, keys: list[str], blocks: list[torch.Tensor]) -> list[bool]: ...

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Wait until no call that already raised StoreError can still touch a block view.

        Backends whose calls can overrun their deadline (Mooncake) override this;
        returns True when idle. A caller must wait before reusing the views of a
        failed call.
        """
        return True

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; idempotent."""


def open_store(kind: str, options: dict[str, Any]) -> KVStore:
    """Open the backend `kind` with its options (see docs/kv-store.md). Raises StoreError."""
    try:
        return _open(kind, options)
    except TypeError as e:  # an unknown or missing option
        raise StoreError(f"bad --kv-store-config for the {kind} store: {e}") from e


def _open(kind: str, options: dict[str, Any]) -> KVStore:
    if kind == "memory":
        from pdserve.store.memory import MemoryStore

        return MemoryStore(**options)
    if kind == "file":
        from pdserve.store.file import FileStore

        return FileStore(**options)
    if kind == "mooncake":
        from pdserve.store.mooncake import MooncakeStore

        return MooncakeStore(**options)
    raise StoreError(f"unknown KV store {kind!r}; use one of {', '.join(STORE_KINDS)}")
