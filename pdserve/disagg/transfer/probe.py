"""Raw bandwidth of a transfer engine between two processes on this host.

`pdserve bench transfer` puts these figures beside its KV transfer figures: the receiver runs in a
child process (spawn) holding a cache-shaped tensor; this process writes every block of its own
same-shaped tensor into it. Parent and child speak JSON bytes over a Pipe (msgspec; nothing is
pickled but the Pipe itself). A probe checks that the copy landed: a broken engine fails the probe
rather than reporting a speed. This module knows nothing about models or requests.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

import msgspec
import torch

from pdserve.disagg.transfer.base import TransferEngine, TransferError
from pdserve.messages import KVRegion
from pdserve.piped_child import PipedChild

ENGINES = ("shm", "mooncake")
_START_TIMEOUT_S = 120.0  # a spawned child imports torch and pdserve: seconds on a loaded machine
_REPLY_TIMEOUT_S = 60.0


def digest(tensor: torch.Tensor) -> str:
    return hashlib.blake2b(tensor.contiguous().view(torch.uint8).numpy().data, digest_size=16).hexdigest()


def open_engine(engine: str, kv_cache: torch.Tensor, shm_path: str | None = None) -> TransferEngine:
    """An engine over `kv_cache`; for "shm", `shm_path` is the file backing it (None: sends only)."""
    if engine == "shm":
        from pdserve.disagg.transfer.shm import ShmEngine

        return ShmEngine(kv_cache, shm_path)
    if engine == "mooncake":
        from pdserve.disagg.transfer.mooncake import MooncakeEngine

        return MooncakeEngine(kv_cache)
    raise ValueError(f"transfer engine {engine!r} is not one of {', '.join(ENGINES)}")


def _serve(conn: Connection, engine_name: str, shape: tuple[int, ...], dtype_name: str) -> None:
    """Child process: hold a zeroed cache of `shape` behind `engine_name` and answer the parent's commands:
    b"digest" (blake2b of the cache), b"contents" (its raw bytes), b"zero", b"stop"."""
    from pdserve.disagg.transfer.shm import allocate_shared, release_shared

    path: str | None = None
    engine: TransferEngine | None = None
    try:
        dtype = getattr(torch, dtype_name)
        if engine_name == "shm":
            cache, path = allocate_shared(shape, dtype, "probe")
        else:
            cache = torch.zeros(shape, dtype=dtype)
        engine = open_engine(engine_name, cache, path)
        conn.send_bytes(msgspec.json.encode(engine.region()))
        while (command := conn.recv_bytes()) != b"stop":
            if command == b"digest":
                conn.send_bytes(msgspec.json.encode({"digest": digest(cache)}))
            elif command == b"contents":
                conn.send_bytes(cache.contiguous().view(torch.uint8).numpy().tobytes())
            elif command == b"zero":
                cache.zero_()
                conn.send_bytes(b"{}")
    except (EOFError, OSError):
        pass  # the parent went away
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises
        conn.send_bytes(msgspec.json.encode({"error": f"{type(e).__name__}: {e}"}))
    finally:
        if engine is not None:
            engine.close()
        if path is not None:
            release_shared(path)


class Receiver:
    """A child process holding a zeroed cache of `shape` that peers write through `engine`.

    `region` is where to write; close() stops the child (its shared-memory file goes with it)."""

    def __init__(self, engine: str, shape: Sequence[int], dtype: torch.dtype = torch.uint8) -> None:
        if engine not in ENGINES:
            raise ValueError(f"transfer engine {engine!r} is not one of {', '.join(ENGINES)}")
        self.shape = tuple(int(n) for n in shape)
        self.dtype = dtype
        self._child = PipedChild(
            _serve,
            (engine, self.shape, str(dtype).split(".")[-1]),
            f"pdserve-probe-{engine}",
            "the receiver process",
            TransferError,
        )
        self.region: KVRegion | None = None
        try:
            self.region = msgspec.convert(self._decode(self._child.recv(_START_TIMEOUT_S)), KVRegion)
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int | None:
        return self._child.process.pid

    def _ask(self, command: bytes) -> bytes:
        self._child.send(command)
        return self._child.recv(_REPLY_TIMEOUT_S)

    @staticmethod
    def _decode(data: bytes) -> dict[str, Any]:
        try:
            reply = msgspec.json.decode(data)
        except msgspec.DecodeError:
            reply = None
        if not isinstance(reply, dict):
            raise TransferError(f"the receiver sent {data[:80]!r}, not a JSON object")
        if "error" in reply:
            raise TransferError(f"the receiver failed: {reply['error']}")
        return reply

    def digest(self) -> str:
        """blake2b of the receiver's cache (see `digest`)."""
        return str(self._decode(self._ask(b"digest"))["digest"])

    def contents(self) -> torch.Tensor:
        """A copy of the receiver's cache."""
        data = self._ask(b"contents")
        nbytes = torch.Size(self.shape).numel() * self.dtype.itemsize
        if len(data) != nbytes:
            self._decode(data)  # an error report
            raise TransferError(f"the receiver sent {len(data)} bytes of cache; expected {nbytes}")
        return torch.frombuffer(bytearray(data), dtype=self.dtype).view(self.shape)

    def zero(self) -> None:
        self._decode(self._ask(b"zero"))

    def close(self) -> None:
        """Stop the child (killing it after 10 s); safe twice."""
        self._child.close(b"stop", 10.0)
        if self.region is not None and self.region.engine == "shm":
            from pdserve.disagg.transfer.shm import release_shared

            release_shared(self.region.address)  # in case the child was killed

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def measure_raw_bandwidth(engine: str, nbytes: int, chunk_nbytes: int, repeats: int = 5) -> dict[str, Any]:
    """Time `engine` writing a cache of about `nbytes` ([1, 2, num_blocks, chunk_nbytes] bytes) into a
    child process, all blocks in one write, `repeats` times after one untimed write whose copy is checked.

    Returns {"engine", "nbytes" (bytes per write), "seconds_best", "seconds_mean", "gb_per_s_best",
    "gb_per_s_mean"} (GB = 1e9 bytes). Raises TransferError when the engine fails or the copy is wrong.
    """
    if chunk_nbytes <= 0 or nbytes < 2 * chunk_nbytes or repeats < 1:
        raise ValueError(
            f"need chunk_nbytes > 0, nbytes >= 2 * chunk_nbytes and repeats >= 1; got "
            f"nbytes={nbytes}, chunk_nbytes={chunk_nbytes}, repeats={repeats}"
        )
    num_blocks = nbytes // (2 * chunk_nbytes)
    shape = (1, 2, num_blocks, chunk_nbytes)
    generator = torch.Generator().manual_seed(0)
    cache = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    block_ids = list(range(num_blocks))
    with Receiver(engine, shape) as receiver:
        assert receiver.region is not None
        sender = open_engine(engine, cache)
        try:
            written = sender.write(receiver.region, [0], block_ids, block_ids)  # connects; not timed
            if receiver.digest() != digest(cache):
                raise TransferError(
                    f"the {engine} engine reported {written} bytes written, but the receiver's "
                    "cache differs from what was sent: the copy is broken"
                )
            seconds = []
            for _ in range(repeats):
                start = time.perf_counter()
                sender.write(receiver.region, [0], block_ids, block_ids)
                seconds.append(time.perf_counter() - start)
        finally:
            sender.close()
    best, mean = min(seconds), statistics.fmean(seconds)
    return {
        "engine": engine,
        "nbytes": written,
        "seconds_best": best,
        "seconds_mean": mean,
        "gb_per_s_best": written / best / 1e9,
        "gb_per_s_mean": written / mean / 1e9,
    }
