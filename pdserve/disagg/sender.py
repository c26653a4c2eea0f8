"""The worker half of PD direct mode: executes a step plan's KV sends on this rank.

Batches come only from the plan (see DESIGN.md, the multi-rank invariant): first each catch-up send
(blocks computed in earlier steps) as a batch of its own, in plan order; then, as the forward
finishes each layer, one batch with that layer of every layer-wise send, in plan order. Every rank
therefore forms identical batches in identical order whatever its local timing. A sender thread
writes while the main thread computes the next layer; `finish` waits for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import random
import threading
import time
from dataclasses import dataclass

import torch

from pdserve.disagg.transfer.base import TransferEngine, TransferError, pick_region
from pdserve.messages import KVSend, KVSendReport

logger = logging.getLogger(__name__)


def _device_ready() -> torch.cuda.Event | None:
    """On CUDA: marks the work queued so far (KV writes, swap-ins), which a batch must follow."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    event = torch.cuda.Event()
    event.record()
    return event


@dataclass
class _Batch:
    step_id: int
    layers: list[int]  # one layer, or every layer for a catch-up
    sends: list[KVSend]
    ready: torch.cuda.Event | None = None  # GPU: recorded once the layer's KV write was queued


class KVSender:
    def __init__(
        self,
        engines: dict[str, TransferEngine],
        rank: int,
        num_layers: int,
        trace_dir: str | None = None,
        fault_delay_ms: int = 0,
    ) -> None:
        self.engines = engines
        self.rank = rank
        self.num_layers = num_layers
        self.fault_delay_ms = fault_delay_ms
        self._rng = random.Random(os.getpid() ^ rank)  # fault delays differ per rank on purpose
        self._trace = open(os.path.join(trace_dir, f"sends-rank{rank}.jsonl"), "a") if trace_dir else None  # noqa: SIM115
        self._queue: queue.Queue[_Batch | None] = queue.Queue()
        self._done = threading.Condition()
        self._pending = 0
        self._step_id = -1
        self._layerwise: list[KVSend] = []
        self._failed: dict[str, str] = {}
        self._num_bytes = 0
        self._busy = 0.0
        self._digest = hashlib.blake2b(digest_size=16)
        self._rooms: set[str] = set()  # rooms written this step through engines that flush at the end
        self._thread = threading.Thread(target=self._run, name=f"pdserve-kv-sender-{rank}", daemon=True)
        self._thread.start()

    def begin(self, step_id: int, sends: list[KVSend]) -> None:
        """Queue the step's catch-up sends; remember the layer-wise ones for layer_done()."""
        self._step_id = step_id
        self._failed = {}
        self._num_bytes = 0
        self._busy = 0.0
        self._digest = hashlib.blake2b(digest_size=16)
        self._rooms = set()
        self._layerwise = [s for s in sends if s.layerwise]
        for send in sends:
            if not send.layerwise:
                self._submit(_Batch(step_id, list(range(self.num_layers)), [send], _device_ready()))

    @property
    def has_layerwise(self) -> bool:
        return bool(self._layerwise)

    def layer_done(self, layer: int) -> None:
        """Called by the model after `layer` wrote its KV (on the main thread)."""
        if not self._layerwise:
            return
        self._submit(_Batch(self._step_id, [layer], self._layerwise, _device_ready()))

    def finish(self) -> KVSendReport:
        """Wait for every queued batch of this step; the report of what this rank sent."""
        started = time.perf_counter()
        with self._done:
            while self._pending:
                self._done.wait()
        for engine in self.engines.values():
            if engine.waits_on_device:
                try:
                    engine.flush()
                except TransferError as e:
                    for room in self._rooms:
                        self._failed.setdefault(room, str(e))
        return KVSendReport(
            rank=self.rank,
            num_bytes=self._num_bytes,
            failed=dict(self._failed),
            batches_digest=self._digest.hexdigest(),
            seconds_busy=self._busy,
            seconds_exposed=time.perf_counter() - started,
        )

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)
        if self._trace is not None:
            self._trace.close()
            self._trace = None

    def _submit(self, batch: _Batch) -> None:
        entry = {
            "step": batch.step_id,
            "layers": batch.layers if len(batch.layers) == 1 else "all",
            "rooms": [s.room for s in batch.sends],
        }
        line = json.dumps(entry, separators=(",", ":"))
        self._digest.update(line.encode())
        if self._trace is not None:
            self._trace.write(line + "\n")
            self._trace.flush()
        with self._done:
            self._pending += 1
        self._queue.put(batch)

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            try:
                self._write(batch)
            finally:
                with self._done:
                    self._pending -= 1
                    self._done.notify_all()

    def _write(self, batch: _Batch) -> None:
        if self.fault_delay_ms:
            time.sleep(self._rng.uniform(0, self.fault_delay_ms) / 1000)
        started = time.perf_counter()
        host_waited = False
        for send in batch.sends:
            if send.room in self._failed:
                continue
            try:
                engine, region = pick_region(self.engines, send.regions[self.rank])
                if batch.ready is not None and engine.waits_on_device:
                    engine.wait(batch.ready)
                    self._rooms.add(send.room)
                elif batch.ready is not None and not host_waited:
                    batch.ready.synchronize()
                    host_waited = True
                self._num_bytes += engine.write(region, batch.layers, send.src_block_ids, send.dst_block_ids)
            except TransferError as e:
                self._failed[send.room] = str(e)
                logger.warning("KV send of room %s failed on rank %d: %s", send.room, self.rank, e)
            except Exception as e:  # noqa: BLE001 - any engine failure fails the room, never the worker
                self._failed[send.room] = f"{type(e).__name__}: {e}"
                logger.exception("KV send of room %s failed on rank %d", send.room, self.rank)
        self._busy += time.perf_counter() - started
