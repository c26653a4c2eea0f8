"""The file and memory pool backends against the KVStore contract: real files, exact bytes."""

from __future__ import annotations

import os
import threading
import time
import zlib
from pathlib import Path

import pytest
import torch

from pdserve.store import KVStore, StoreError, open_store
from pdserve.store.file import FileStore

NUM_BLOCKS = 8
BLOCK_SHAPE = (4, 16)  # float32: 256 bytes a block
KEYS = ["blk:0@0", "blk:1@0", "a/b:c@1"]


def pattern(key: str, numel: int) -> torch.Tensor:
    """Deterministic float32 contents for `key`."""
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return torch.randn(numel, generator=generator)


@pytest.fixture(params=["memory", "file"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> KVStore:
    options = {"path": str(tmp_path / "pool")} if request.param == "file" else {}
    return open_store(request.param, options)


@pytest.fixture
def buffer() -> torch.Tensor:
    return torch.zeros(NUM_BLOCKS, *BLOCK_SHAPE)  # [num_blocks, 4, 16]


def fill(buffer: torch.Tensor, block_ids: list[int], keys: list[str]) -> None:
    for block_id, key in zip(block_ids, keys):
        buffer[block_id] = pattern(key, buffer[block_id].numel()).view(BLOCK_SHAPE)


def test_round_trip_through_views_of_one_buffer(store: KVStore, buffer: torch.Tensor) -> None:
    store.register_buffer(buffer)
    fill(buffer, [0, 1, 2], KEYS)
    assert store.put(KEYS, [buffer[0], buffer[1], buffer[2]]) == [True, True, True]
    assert store.exists(KEYS + ["blk:9@0"]) == [True, True, True, False]

    assert store.get(list(reversed(KEYS)), [buffer[5], buffer[6], buffer[7]]) == [True, True, True]
    assert torch.equal(buffer[5], buffer[2]) and torch.equal(buffer[6], buffer[1]) and torch.equal(buffer[7], buffer[0])
    assert torch.count_nonzero(buffer[3:5]) == 0  # neighbouring blocks untouched


def test_missing_key_and_size_mismatch_read_false(store: KVStore, buffer: torch.Tensor) -> None:
    store.register_buffer(buffer)
    fill(buffer, [0], KEYS[:1])
    assert store.put(KEYS[:1], [buffer[0]]) == [True]
    assert store.get([KEYS[0], "missing"], [buffer[1], buffer[2]]) == [True, False]
    assert torch.equal(buffer[1], buffer[0])
    assert store.get(KEYS[:1], [buffer[3, :2]]) == [False]  # half a block
    assert store.get(KEYS[:1], [buffer[3:5]]) == [False]  # two blocks
    assert store.exists(["missing"]) == [False]
    assert store.put([], []) == [] and store.get([], []) == [] and store.exists([]) == []


def test_objects_are_immutable_first_write_wins(store: KVStore, buffer: torch.Tensor) -> None:
    store.register_buffer(buffer)
    buffer[0], buffer[1] = 1.0, 2.0
    assert store.put(["k"], [buffer[0]]) == [True]
    assert store.put(["k"], [buffer[1]]) == [True]
    assert store.get(["k"], [buffer[2]]) == [True]
    assert torch.equal(buffer[2], torch.ones(BLOCK_SHAPE))


def test_register_buffer_rejects_non_contiguous(store: KVStore) -> None:
    with pytest.raises(StoreError, match="contiguous CPU tensor"):
        store.register_buffer(torch.zeros(8, 8).t())


def test_file_store_is_shared_between_instances_and_keys_any_string(tmp_path: Path, buffer: torch.Tensor) -> None:
    writer, reader = FileStore(str(tmp_path)), FileStore(str(tmp_path))
    keys = ["x:1@0", "../../etc/passwd", "k" * 600, "ünïcode:@"]
    fill(buffer, [0, 1, 2, 3], keys)
    assert writer.put(keys, [buffer[i] for i in range(4)]) == [True] * 4
    assert reader.exists(keys) == [True] * 4
    assert reader.get(keys, [buffer[i] for i in range(4, 8)]) == [True] * 4
    assert torch.equal(buffer[4:8], buffer[0:4])
    names = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert len(names) == 4 and all(len(name) == 2 + 1 + 62 for name in names)  # <2 hex>/<62 hex>


def test_file_store_short_file_reads_false_then_is_rewritten(tmp_path: Path, buffer: torch.Tensor) -> None:
    store = FileStore(str(tmp_path))
    fill(buffer, [0], ["k"])
    assert store.put(["k"], [buffer[0]]) == [True]
    path = store._file("k")
    with open(path, "r+b") as f:
        f.truncate(100)  # a torn object: 100 of 256 bytes
    assert store.exists(["k"]) == [True]
    assert store.get(["k"], [buffer[1]]) == [False]
    assert store.put(["k"], [buffer[0]]) == [True]  # a torn object is rewritten
    assert store.get(["k"], [buffer[1]]) == [True]
    assert torch.equal(buffer[1], buffer[0])


def test_file_store_failed_write_leaves_nothing(
    tmp_path: Path, buffer: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileStore(str(tmp_path))

    def no_space(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    assert store.put(["k", "j"], [buffer[0], buffer[1]]) == [False, False]
    monkeypatch.undo()
    assert store.exists(["k", "j"]) == [False, False]
    assert store.get(["k"], [buffer[2]]) == [False]
    assert os.listdir(tmp_path / "tmp") == []  # temp files removed


def test_file_store_readers_never_see_a_partial_object(tmp_path: Path) -> None:
    """A reader racing a writer of 4 MiB objects gets each object whole or not at all."""
    num_objects, numel = 16, 1 << 20
    source = torch.zeros(num_objects, numel)
    for i in range(num_objects):
        source[i] = float(i + 1)
    sink = torch.zeros(numel)
    writer, reader = FileStore(str(tmp_path)), FileStore(str(tmp_path))
    keys = [f"obj:{i}" for i in range(num_objects)]
    done = threading.Event()
    written: list[bool] = []

    def write() -> None:
        try:
            for i, key in enumerate(keys):
                written.extend(writer.put([key], [source[i]]))
        finally:
            done.set()

    thread = threading.Thread(target=write)
    thread.start()
    num_whole = 0
    while not done.is_set() or num_whole < num_objects:
        num_whole = 0
        for i, key in enumerate(keys):
            sink.zero_()
            if reader.get([key], [sink])[0]:
                assert torch.equal(sink, source[i]), f"{key} read before it was whole"
                num_whole += 1
        if done.is_set() and len(written) < num_objects:
            break  # the writer failed; reported below
    thread.join()
    assert written == [True] * num_objects
    assert num_whole == num_objects


def test_file_store_removes_stale_temp_files_only(tmp_path: Path) -> None:
    FileStore(str(tmp_path))
    stale, fresh = tmp_path / "tmp" / "stale.1", tmp_path / "tmp" / "fresh.1"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    FileStore(str(tmp_path))
    assert not stale.exists() and fresh.exists()


def test_file_store_unwritable_path_says_what_to_fix(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_bytes(b"")
    with pytest.raises(StoreError, match=r"cannot write to the file store directory .*a-file/pool .*writable"):
        open_store("file", {"path": str(tmp_path / "a-file" / "pool")})


def test_unknown_kind() -> None:
    with pytest.raises(StoreError, match="unknown KV store 'redis'; use one of mooncake, file, memory"):
        open_store("redis", {})
