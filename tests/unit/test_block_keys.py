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
from pdserve.disagg.storage import prompt_object_keys
from pdserve.kvcache.keys import KEY_BYTES, ModelFingerprint, chain_key, chain_keys, object_key, partial_key

FINGERPRINT = ModelFingerprint(
    weights_id="HuggingFaceTB/SmolLM2-135M-Instruct@seed0",
    dtype="bfloat16",
    block_size=16,
    layout="block-major:L30x2xT16xH3xD64",
    tp_size=1,
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
    fields = [
        b"pdserve-kv-v1",
        b"weights=HuggingFaceTB/SmolLM2-135M-Instruct@seed0",
        b"dtype=bfloat16",
        b"block_size=16",
        b"layout=block-major:L30x2xT16xH3xD64",
        b"tp_size=1",
    ]
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
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, path], env=env, capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
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


# ---- partial-block names (storage-mode PD writes a prompt's last incomplete block under one) ----------


def test_partial_keys_differ_from_the_full_keys_of_the_same_prefix() -> None:
    root = b"r" * 16
    tokens = list(range(12))
    full = chain_keys(root, tokens, 4)  # three full blocks
    full_names = {k.hex() for k in full}
    for length in range(1, 12):  # every prefix that ends inside a block
        if length % 4 == 0:
            assert partial_key(root, full[: length // 4], tokens[:length], 4) is None
            continue
        name = partial_key(root, full[: length // 4], tokens[:length], 4)
        assert name is not None
        hex_part = name.split(":")[0]
        assert name not in full_names and hex_part not in full_names
        # the block it completes, once full, has another name
        assert hex_part != full[length // 4].hex()
    # nor do their pool objects
    name = partial_key(root, full[:1], tokens[:6], 4)
    assert name is not None
    assert all(object_key(name, rank) != object_key(k, rank) for k in full for rank in (0, 1))


def test_partial_keys_differ_by_count_and_by_tail_tokens() -> None:
    root = b"r" * 16
    tokens = list(range(10))
    full = chain_keys(root, tokens, 4)
    names = [partial_key(root, full, tokens[:8] + tail, 4) for tail in ([8], [8, 9], [8, 9, 10])]
    assert [n.rsplit(":", 1)[1] for n in names if n] == ["1", "2", "3"]
    assert len(set(names)) == 3
    # the same count, other tail tokens
    assert partial_key(root, full, [*tokens[:8], 8, 9], 4) != partial_key(root, full, [*tokens[:8], 8, 10], 4)
    assert partial_key(root, full, [*tokens[:8], 8, 9], 4) != partial_key(root, full, [*tokens[:8], 9, 8], 4)
    # the same tail after another prefix
    other = chain_keys(root, list(range(50, 58)), 4)
    assert partial_key(root, other, [*range(50, 58), 8, 9], 4) != partial_key(root, full, tokens, 4)
    # no full block: chained from the root, so another root gives another name
    assert partial_key(root, [], [1, 2], 4) != partial_key(b"s" * 16, [], [1, 2], 4)
    # extra bytes are part of the partial name as they are of full keys
    assert partial_key(root, full, tokens, 4, extra=b"lora-1") != partial_key(root, full, tokens, 4)


_PARTIAL_CHILD = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("keys", sys.argv[1])
keys = sys.modules["keys"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(keys)
root = keys.ModelFingerprint("m", "float16", 4, "L2x2xT4xH1xD8", 2).root()
for n in (1, 3, 5, 6, 7, 9, 11):
    tokens = list(range(1000, 1000 + n))
    print(keys.partial_key(root, keys.chain_keys(root, tokens, 4), tokens, 4))
"""


def _partial_names_here() -> list[str]:
    root = ModelFingerprint("m", "float16", 4, "L2x2xT4xH1xD8", 2).root()
    names = []
    for n in (1, 3, 5, 6, 7, 9, 11):
        tokens = list(range(1000, 1000 + n))
        name = partial_key(root, chain_keys(root, tokens, 4), tokens, 4)
        assert name is not None
        names.append(name)
    return names


@pytest.mark.parametrize("hash_seed", ["0", "4242"])
def test_same_partial_keys_in_another_process(hash_seed: str) -> None:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    path = str(Path(keys_module.__file__))
    out = subprocess.run(
        [sys.executable, "-c", _PARTIAL_CHILD, path], env=env, capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    here = _partial_names_here()
    assert out == here
    assert len(set(here)) == len(here) and all(":partial:" in name for name in here)


@pytest.mark.parametrize("length", [1, 3, 4, 8, 12, 10, 13])
def test_prompt_object_keys_are_the_chained_keys_then_the_partial_one(length: int) -> None:
    from pdserve.kvcache.manager import KVCacheManager
    from pdserve.request import Request, SamplingParams

    bs, root = 4, b"root-for-this-test"
    kv = KVCacheManager(16, bs, root=root, num_host_blocks=4, has_pool=True)
    prompt = tuple(range(300, 300 + length))
    request = Request("r", prompt, SamplingParams())
    full = chain_keys(root, prompt, bs)
    assert len(full) == length // bs
    tail = prompt[len(full) * bs :]
    expected = [k.hex() for k in full]
    if tail:
        expected.append(f"{chain_key(full[-1] if full else root, tail).hex()}:partial:{len(tail)}")
        assert expected[-1] == partial_key(root, full, prompt, bs)
    names = prompt_object_keys(kv, request)
    assert names == expected
    assert len(names) == -(-length // bs)
    # output tokens (D decoding, or P's sampled token) never change the names of the prompt's objects
    request.output_token_ids.extend(range(900, 906))
    kv.keys_for(request)  # extends the cached chain past the prompt
    assert prompt_object_keys(kv, request) == expected
    # another root (another model, dtype, block size, layout or TP size) names other objects
    other = KVCacheManager(16, bs, root=b"another-root", num_host_blocks=4, has_pool=True)
    assert not set(prompt_object_keys(other, Request("r", prompt, SamplingParams()))) & set(expected)
