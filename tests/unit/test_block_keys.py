"""Chained block keys: pinned values, process independence, chaining, names of partial blocks and pool objects."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import pdserve.kvcache.keys as keys_module
from pdserve.kvcache.keys import KEY_BYTES, ModelFingerprint, chain_key, chain_keys, object_key, partial_key

FINGERPRINT = ModelFingerprint(
    weights_id="HuggingFaceTB/SmolLM2-135M-Instruct@seed0", dtype="bfloat16", block_size=16,
    layout="block-major:L30x2xT16xH3xD64", tp_size=1,
)
TOKENS = list(range(40))  # two full blocks of 16, then 8 tokens
# Computed once with pdserve 0.1.0. A change here orphans every block already in a pool: bump "pdserve-kv-v1".
GOLDEN_ROOT = "9a3c74d8bfaf560ff8f0c0ac47c5a345"
GOLDEN_KEYS = ["989841eaf80aefeadf16f55ff357763c", "eba9e3281641ba52592c1cf917dd0250"]
GOLDEN_PARTIAL = "b28e3369be501c45e2c8025a508db7bb:partial:8"


def test_golden_values_are_stable() -> None:
    root = FINGERPRINT.root()
    keys = chain_keys(root, TOKENS, 16)
    assert root.hex() == GOLDEN_ROOT
    assert [k.hex() for k in keys] == GOLDEN_KEYS
    assert partial_key(root, keys, TOKENS, 16) == GOLDEN_PARTIAL
    assert all(len(k) == KEY_BYTES == 16 for k in [root, *keys])


def _blake(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(len(part).to_bytes(4, "little") + part)
    return h.digest()


def test_encoding_is_length_prefixed_blake2b_of_little_endian_uint32() -> None:
    """The documented encoding, rebuilt from hashlib alone: another implementation can name the same blocks."""
    fields = [b"pdserve-kv-v1", b"weights=HuggingFaceTB/SmolLM2-135M-Instruct@seed0", b"dtype=bfloat16",
              b"block_size=16", b"layout=block-major:L30x2xT16xH3xD64", b"tp_size=1"]
    root = _blake(*fields)
    assert root == FINGERPRINT.root()
    key0 = _blake(root, b"".join(t.to_bytes(4, "little") for t in range(16)), b"")
    key1 = _blake(key0, b"".join(t.to_bytes(4, "little") for t in range(16, 32)), b"")
    assert [key0, key1] == chain_keys(root, TOKENS, 16)
    tail = _blake(key1, b"".join(t.to_bytes(4, "little") for t in range(32, 40)), b"")
    assert partial_key(root, [key0, key1], TOKENS, 16) == f"{tail.hex()}:partial:8"


_CHILD = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("keys", sys.argv[1])
keys = sys.modules["keys"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(keys)
fp = keys.ModelFingerprint("HuggingFaceTB/SmolLM2-135M-Instruct@seed0", "bfloat16", 16,
                           "block-major:L30x2xT16xH3xD64", 1)
root = fp.root()
ks = keys.chain_keys(root, list(range(40)), 16)
print(root.hex(), *(k.hex() for k in ks), keys.partial_key(root, ks, list(range(40)), 16))
"""


@pytest.mark.parametrize("hash_seed", ["0", "12345"])
def test_same_keys_in_another_process_with_another_hash_seed(hash_seed: str) -> None:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    path = str(Path(keys_module.__file__))  # keys.py alone: stdlib only, so the child starts in milliseconds
    out = subprocess.run([sys.executable, "-c", _CHILD, path], env=env, capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    assert out == [GOLDEN_ROOT, *GOLDEN_KEYS, GOLDEN_PARTIAL]


def test_a_key_names_the_whole_prefix() -> None:
    root = b"r" * 16
    after_a = chain_keys(root, [1, 2, 3, 4, 9, 9, 9, 9], 4)
    after_b = chain_keys(root, [5, 6, 7, 8, 9, 9, 9, 9], 4)
    assert after_a[0] != after_b[0]
    assert after_a[1] != after_b[1]  # the same block tokens after a different prefix
    shared = list(range(8))
    one = chain_keys(root, [*shared, 10, 11, 12, 13, 14], 4)
    two = chain_keys(root, [*shared, 20, 21, 22, 23], 4)
    assert len(one) == len(two) == 3  # a trailing partial block has no full key
    assert one[:2] == two[:2] and one[2] != two[2]
    # chaining from the key before gives the same keys as one pass
    assert chain_keys(one[1], [10, 11, 12, 13], 4) == one[2:]
    assert chain_keys(root, [*shared, 10, 11, 12, 13], 4) == one
    assert chain_keys(root, [1, 2, 3], 4) == []
    assert chain_key(root, [1, 2, 3, 4]) == after_a[0]
    # another root, or extra bytes (e.g. a LoRA id), give other keys for the same tokens
    assert chain_keys(b"s" * 16, shared, 4)[0] != chain_keys(root, shared, 4)[0]
    assert chain_keys(root, shared, 4, extra=b"lora-1") != chain_keys(root, shared, 4)
    assert chain_keys(root, shared, 4, extra=b"lora-1") == chain_keys(root, shared, 4, extra=b"lora-1")


def test_block_size_is_part_of_the_chain() -> None:
    """Keys over the same tokens with other block boundaries differ."""
    root = b"r" * 16
    assert chain_keys(root, list(range(8)), 8)[0] != chain_keys(root, list(range(8)), 4)[1]


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(ModelFingerprint)])
def test_every_fingerprint_field_changes_the_root(name: str) -> None:
    value = getattr(FINGERPRINT, name)
    changed = value + 1 if isinstance(value, int) else value + "x"
    other = dataclasses.replace(FINGERPRINT, **{name: changed})  # type: ignore[arg-type]
    assert other.root() != FINGERPRINT.root()
    assert chain_keys(other.root(), TOKENS, 16)[0] != chain_keys(FINGERPRINT.root(), TOKENS, 16)[0]
    assert dataclasses.replace(other, **{name: value}).root() == FINGERPRINT.root()


def test_fingerprint_fields_are_not_confusable() -> None:
    """Length-prefixed fields: moving text from one field into the next gives another root."""
    a = dataclasses.replace(FINGERPRINT, weights_id="m", dtype="x,dtype=bf16")
    b = dataclasses.replace(FINGERPRINT, weights_id="m,dtype=x", dtype="bf16")
    assert a.root() != b.root()


def test_partial_key_format_and_none_for_full_blocks() -> None:
    root = b"r" * 16
    tokens = list(range(10))
    full = chain_keys(root, tokens, 4)
    assert len(full) == 2
    assert partial_key(root, full, tokens, 4) == f"{chain_key(full[1], [8, 9]).hex()}:partial:2"
    assert partial_key(root, [], [7, 8, 9], 4) == f"{chain_key(root, [7, 8, 9]).hex()}:partial:3"
    assert partial_key(root, full, tokens[:8], 4) is None
    assert partial_key(root, [], [], 4) is None
    # the partial name differs from the full key of a block that starts with the same tokens
    assert partial_key(root, full, [*tokens[:8], 8], 4) != partial_key(root, full, tokens, 4)
    name = partial_key(root, full, tokens, 4)
    assert name is not None
    hex_part, word, count = name.split(":")
    assert (len(hex_part), word, count) == (2 * KEY_BYTES, "partial", "2")
    int(hex_part, 16)


def test_object_key_names_one_rank_shard() -> None:
    key = chain_key(b"r" * 16, [1, 2, 3, 4])
    assert object_key(key, 0) == f"{key.hex()}@0"
    assert object_key(key, 3) == f"{key.hex()}@3"
    assert object_key(key.hex(), 3) == object_key(key, 3)
    assert object_key("ab12:partial:2", 1) == "ab12:partial:2@1"


def test_token_ids_up_to_uint32_max_are_accepted() -> None:
    root = b"r" * 16
    top = chain_keys(root, [2**32 - 1] * 4, 4)
    assert len(top) == 1 and top != chain_keys(root, [0] * 4, 4)
    assert top[0] == _blake(root, b"\xff" * 16, b"")
    with pytest.raises(struct.error):
        chain_keys(root, [2**32, 0, 0, 0], 4)
    with pytest.raises(struct.error):
        chain_keys(root, [-1, 0, 0, 0], 4)
