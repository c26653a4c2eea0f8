"""Transfer engines across two processes: exact block placement, failures as TransferError, the probe.

Each receiver is a spawned child (pdserve.disagg.transfer.probe.Receiver) holding a zeroed cache; the
sender is this process.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import msgspec
import pytest
import torch
from helpers import require_module

from pdserve.disagg.transfer.base import TransferEngine, TransferError
from pdserve.disagg.transfer.probe import Receiver, measure_raw_bandwidth
from pdserve.disagg.transfer.shm import SHM_DIR, ShmEngine, allocate_shared, release_shared, sweep_stale

SHAPE = (3, 2, 8, 4, 2, 8)  # [num_layers, 2, num_blocks, block_size, heads, dim]
CHUNK_NBYTES = 4 * 2 * 8 * 4


def source_cache() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) + 10.0  # never zero


def expected_after(src: torch.Tensor, layers: list[int], src_ids: list[int], dst_ids: list[int]) -> torch.Tensor:
    expected = torch.zeros(SHAPE)
    for layer in layers:
        for s, d in zip(src_ids, dst_ids):
            expected[layer, :, d] = src[layer, :, s]
    return expected


def write_within(engine: TransferEngine, timeout_s: float, *args: object) -> BaseException | None:
    """Run engine.write(*args) on a thread; fail the test if it takes longer than timeout_s."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            engine.write(*args)  # type: ignore[arg-type]
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - inspected by the test
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"write did not return within {timeout_s} s"
    return outcome[0]


# ---- shm


def test_shm_write_lands_exactly() -> None:
    src = source_cache()
    sender = ShmEngine(src, None)
    assert sender.region() is None  # a sender without a shared cache offers nothing
    with Receiver("shm", SHAPE, torch.float32) as receiver:
        assert receiver.region is not None and receiver.region.chunk_nbytes == CHUNK_NBYTES
        assert sender.write(receiver.region, [0, 2], [3, 5], [1, 7]) == 2 * 2 * 2 * CHUNK_NBYTES
        got = receiver.contents()
    sender.close()
    assert torch.equal(got, expected_after(src, [0, 2], [3, 5], [1, 7]))  # other blocks and layer 1 stay zero


def test_shm_write_to_removed_file_raises() -> None:
    cache, path = allocate_shared(SHAPE, torch.float32, "test-removed")
    sender = ShmEngine(source_cache(), None)
    region = ShmEngine(cache, path).region()
    assert region is not None
    sender.write(region, [0], [0], [0])  # maps the file
    release_shared(path)
    with pytest.raises(TransferError, match="gone"):
        sender.write(region, [0], [0], [0])
    with pytest.raises(TransferError, match="gone"):  # a sender that never mapped it
        ShmEngine(source_cache(), None).write(region, [0], [0], [0])


def test_shm_peer_mismatch_raises() -> None:
    cache, path = allocate_shared(SHAPE, torch.float32, "test-mismatch")
    try:
        region = ShmEngine(cache, path).region()
        assert region is not None
        sender = ShmEngine(source_cache(), None)
        with pytest.raises(TransferError, match="chunks"):
            sender.write(msgspec.structs.replace(region, chunk_nbytes=CHUNK_NBYTES * 2), [0], [0], [0])
        with pytest.raises(TransferError, match="outside"):
            sender.write(region, [0], [0], [8])
    finally:
        release_shared(path)


def test_sweep_stale_removes_only_dead_owners() -> None:
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    dead = SHM_DIR / f"pdserve-kv-{pid_max + 1}-test"  # above pid_max: no such process, ever
    live = SHM_DIR / f"pdserve-kv-{os.getpid()}-test-live"
    try:
        dead.write_bytes(b"x")
        live.write_bytes(b"x")
        sweep_stale()
        assert not dead.exists() and live.exists()
    finally:
        dead.unlink(missing_ok=True)
        live.unlink(missing_ok=True)


# ---- mooncake


@pytest.fixture(scope="module")
def mooncake_engine_cls() -> type[TransferEngine]:
    require_module("mooncake.engine")  # under CI=true a missing Mooncake fails instead of skipping
    from pdserve.disagg.transfer.mooncake import MooncakeEngine

    return MooncakeEngine


def test_merge_runs() -> None:
    from pdserve.disagg.transfer.mooncake import merge_runs

    # chunks at 0, 10, 20 then 40 (a gap), with destinations consecutive only for the first two
    assert merge_runs([0, 10, 20, 40], [100, 110, 130, 140], 10) == ([0, 20, 40], [100, 130, 140], [20, 10, 10])
    assert merge_runs([], [], 10) == ([], [], [])


def test_mooncake_write_lands_exactly(mooncake_engine_cls: type[TransferEngine]) -> None:
    src = source_cache()
    sender = mooncake_engine_cls(src)
    try:
        with Receiver("mooncake", SHAPE, torch.float32) as receiver:
            region = receiver.region
            assert region is not None and region.engine == "mooncake" and region.chunk_nbytes == CHUNK_NBYTES
            # 2..4 -> 5..7 merge into one run per (layer, K|V); 0 -> 0 and 6 -> 2 stand alone
            src_ids, dst_ids = [2, 3, 4, 0, 6], [5, 6, 7, 0, 2]
            assert sender.write(region, [0, 2], src_ids, dst_ids) == 2 * 2 * 5 * CHUNK_NBYTES
            assert torch.equal(receiver.contents(), expected_after(src, [0, 2], src_ids, dst_ids))
            receiver.zero()
            # every block of every layer: one run for the whole cache
            all_ids = list(range(SHAPE[2]))
            sender.write(region, [0, 1, 2], all_ids, all_ids)
            assert torch.equal(receiver.contents(), src)

            with pytest.raises(TransferError, match="outside"):
                sender.write(region, [0], [0], [SHAPE[2]])
            with pytest.raises(TransferError, match=region.address):  # past the peer's registered memory
                sender.write(msgspec.structs.replace(region, base=region.base + CHUNK_NBYTES), [2], [7], [7])
    finally:
        sender.close()
        sender.close()


def test_mooncake_write_to_exited_peer_raises(mooncake_engine_cls: type[TransferEngine]) -> None:
    sender = mooncake_engine_cls(source_cache())
    try:
        with Receiver("mooncake", SHAPE, torch.float32) as receiver:
            region = receiver.region
            assert region is not None
            sender.write(region, [0], [0], [0])  # connected
        start = time.monotonic()
        error = write_within(sender, 10.0, region, [0], [1], [1])
        assert isinstance(error, TransferError) and region.address in str(error), error
        assert time.monotonic() - start < 5.0
        # later writes: the connection is refused
        assert isinstance(write_within(sender, 10.0, region, [0], [1], [1]), TransferError)
    finally:
        sender.close()
    with pytest.raises(TransferError, match="closed"):
        sender.write(region, [0], [0], [0])


# ---- probe


@pytest.mark.parametrize("engine", ["shm", "mooncake"])
def test_probe_measures_bandwidth(engine: str) -> None:
    if engine == "mooncake":
        require_module("mooncake.engine")
    result = measure_raw_bandwidth(engine, 8 << 20, 256 << 10, repeats=2)
    assert result["engine"] == engine and result["nbytes"] == 8 << 20
    assert result["seconds_best"] <= result["seconds_mean"]
    assert result["gb_per_s_best"] >= result["gb_per_s_mean"] > 0


class _NoCopyEngine(ShmEngine):
    """Claims every write succeeded and copies nothing."""

    def write(self, peer, layers, src_block_ids, dst_block_ids):  # type: ignore[no-untyped-def]
        return len(layers) * 2 * len(src_block_ids) * self.chunk_nbytes


def test_probe_detects_a_broken_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    from pdserve.disagg.transfer import probe

    monkeypatch.setattr(probe, "open_engine", lambda engine, cache, path=None: _NoCopyEngine(cache, path))
    with pytest.raises(TransferError, match="broken"):
        measure_raw_bandwidth("shm", 1 << 20, 64 << 10, repeats=1)
