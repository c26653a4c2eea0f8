"""Pool backends for the KV cache's third tier: mooncake, file, memory.

A backend stores opaque byte objects under string keys. It knows nothing about
models, blocks or requests; the worker hands it views into one registered host
buffer. Any failure is reported, never raised into the engine: the caller
treats it as a cache miss.
"""

from pdserve.store.base import KVStore, StoreError, open_store

__all__ = ["KVStore", "StoreError", "open_store"]
