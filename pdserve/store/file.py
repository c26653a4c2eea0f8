"""A directory backend: one file per object, shared by every process that opens the same path.

Keys are hashed (SHA-256) into file names `<path>/<2 hex>/<62 hex>`, so any key
(':' and '@' included) is safe on any filesystem; the key itself is not stored.
Writes go to `<path>/tmp/` first and are moved into place with os.replace, so a
reader sees a whole object or none. A file of the wrong size (torn by a crash)
reads as a miss and is rewritten by the next put. Without fsync, objects
survive a process restart, not necessarily a power loss. There is no eviction
and no capacity limit: delete the directory to clear the pool.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid

import torch

from pdserve.store.base import KVStore, StoreError

_STALE_TMP_S = 600.0  # temp files older than this are left by a writer that died; removed at open


class FileStore(KVStore):
    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(os.path.expanduser(path))
        self._tmp_dir = os.path.join(self.path, "tmp")
        try:
            os.makedirs(self._tmp_dir, exist_ok=True)
            probe = os.path.join(self._tmp_dir, f"probe-{uuid.uuid4().hex}")
            with open(probe, "wb") as f:
                f.write(b"\0")
            os.remove(probe)
        except OSError as e:
            raise StoreError(
                f"cannot write to the file store directory {self.path} ({e.strerror}); "
                f'pass a writable directory in --kv-store-config, e.g. {{"path": "/tmp/pdserve-kv"}}'
            ) from e
        self._remove_stale_tmp()

    def register_buffer(self, buffer: torch.Tensor) -> None:
        if buffer.device.type != "cpu" or not buffer.is_contiguous():
            raise StoreError("the registered buffer must be a contiguous CPU tensor")

    def exists(self, keys: list[str]) -> list[bool]:
        return [os.path.isfile(self._file(key)) for key in keys]

    def put(self, keys: list[str], blocks: list[torch.Tensor]) -> list[bool]:
        return [self._put_one(key, block) for key, block in zip(keys, blocks)]

    def get(self, keys: list[str], blocks: list[torch.Tensor]) -> list[bool]:
        return [self._get_one(key, block) for key, block in zip(keys, blocks)]

    def _file(self, key: str) -> str:
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
        return os.path.join(self.path, digest[:2], digest[2:])

    def _put_one(self, key: str, block: torch.Tensor) -> bool:
        target = self._file(key)
        data = _bytes_of(block)  # [nbytes] uint8, shares the block's memory
        if _size_of(target) == data.numel():
            return True  # objects are immutable; a torn one (wrong size) is rewritten
        tmp = os.path.join(self._tmp_dir, f"{os.path.basename(target)}.{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                f.write(data.numpy().data)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(tmp, target)
            return True
        except OSError:
            _remove_quietly(tmp)
            return False

    def _get_one(self, key: str, block: torch.Tensor) -> bool:
        data = _bytes_of(block)  # [nbytes] uint8, shares the block's memory
        try:
            with open(self._file(key), "rb", buffering=0) as f:
                if os.fstat(f.fileno()).st_size != data.numel():
                    return False
                view = data.numpy().data
                num_read = 0
                while num_read < len(view):
                    n = f.readinto(view[num_read:])
                    if not n:
                        return False
                    num_read += n
            return True
        except OSError:
            return False

    def _remove_stale_tmp(self) -> None:
        cutoff = time.time() - _STALE_TMP_S
        try:
            with os.scandir(self._tmp_dir) as entries:
                for entry in entries:
                    if entry.stat().st_mtime < cutoff:
                        _remove_quietly(entry.path)
        except OSError:
            pass  # another process is cleaning up too


def _bytes_of(block: torch.Tensor) -> torch.Tensor:
    if block.device.type != "cpu" or not block.is_contiguous():
        raise StoreError("blocks must be contiguous CPU tensors (views into the registered buffer)")
    return block.reshape(-1).view(torch.uint8)


def _size_of(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
