"""Chained block keys: stable names for the KV of a token prefix.

key_0 = H(root, tokens of block 0, extra), key_i = H(key_{i-1}, tokens of block i, extra),
root = H(model fingerprint). A block's key therefore names the whole prefix up
to and including it. The last incomplete block is named `<chained key>:partial:N`
(N real tokens). H is BLAKE2b-128 over a canonical byte encoding (little-endian
uint32 token ids, length-prefixed fields), never pickle or Python's hash(), so
keys agree across processes, hosts and Python versions.

The TP rank is not in the chain: the engine core computes one chain for all
ranks, and a rank's pool object is named `<key>@<rank>` (see object_key).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

KEY_BYTES = 16


def _h(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=KEY_BYTES)
    for part in parts:
        h.update(struct.pack("<I", len(part)))
        h.update(part)
    return h.digest()


@dataclass(frozen=True)
class ModelFingerprint:
    """Everything that changes the bytes of a KV block, besides the tokens."""

    weights_id: str
    dtype: str
    block_size: int
    layout: str  # e.g. "L30xKVH3xD64" (per-rank shape of one block)
    tp_size: int

    def root(self) -> bytes:
        fields = (
            f"weights={self.weights_id}",
            f"dtype={self.dtype}",
            f"block_size={self.block_size}",
            f"layout={self.layout}",
            f"tp_size={self.tp_size}",
        )
        return _h(b"pdserve-kv-v1", *(f.encode() for f in fields))


def chain_key(prev: bytes, token_ids: Sequence[int], extra: bytes = b"") -> bytes:
    return _h(prev, struct.pack(f"<{len(token_ids)}I", *token_ids), extra)


def chain_keys(prev: bytes, token_ids: Sequence[int], block_size: int, extra: bytes = b"") -> list[bytes]:
    """Keys of the full blocks of `token_ids`, chained after `prev` (the root, or the key of the block before)."""
    keys = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        prev = chain_key(prev, token_ids[start : start + block_size], extra)
        keys.append(prev)
    return keys


def partial_key(
    root: bytes, full_keys: Sequence[bytes], token_ids: Sequence[int], block_size: int, extra: bytes = b""
) -> str | None:
    """Name of the last incomplete block of `token_ids`, or None if the last block is full."""
    num_full = len(token_ids) // block_size
    tail = token_ids[num_full * block_size :]
    if not tail:
        return None
    prev = full_keys[num_full - 1] if num_full else root
    return f"{chain_key(prev, tail, extra).hex()}:partial:{len(tail)}"


def object_key(key: bytes | str, rank: int) -> str:
    """The pool object holding `rank`'s shard of the block named `key`."""
    text = key.hex() if isinstance(key, bytes) else key
    return f"{text}@{rank}"
