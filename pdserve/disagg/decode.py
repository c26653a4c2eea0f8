"""D's control plane: admit with a reserve, tell P where to write (KVDest), start decoding on KVDone.

A request with a transfer handle waits here, not in the scheduler's queue: D never prefills it. It is
admitted FIFO when its prompt's blocks fit beside the reserve for the future decode tokens of the
requests already running (disagg.reserve); then D sends KVDest to P and starts a receive deadline.
KVDone hands it to the scheduler with its prompt computed and P's first token appended. No capacity
within the admission timeout: 503 no_capacity. No KVDone by the deadline: 502 kv_transfer_timeout.
Pure Python: no tensors (P's ranks write the blocks; D's CPU does nothing per block).

Storage mode: on KVDone, D reads the prompt's blocks from the pool (every rank its own objects) into host
blocks, and swap-ins copy them into the request's blocks before its first decode step. Blocks missing or
unreadable (or never written: P's KVDone says so): with --kv-load-failure-policy fail, 502 kv_load_failed
saying how many; with recompute, D keeps the leading blocks it read and prefills the rest itself.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from pdserve.config import DisaggConfig
from pdserve.disagg.control import ControlChannel, prompt_digest
from pdserve.disagg.counters import TransferStats
from pdserve.disagg.prefill import WRITE_FAILED
from pdserve.disagg.reserve import DecodeReserve, Reservee
from pdserve.kvcache.manager import KVCacheManager, PoolLoad
from pdserve.messages import KVAbort, KVDest, KVDone, KVRegion, TransferHandle
from pdserve.request import FinishReason, Request, RequestStatus
from pdserve.scheduler.scheduler import RequestError, RequestUpdate, Scheduler

logger = logging.getLogger(__name__)


QUARANTINE_SECONDS = 5.0

# storage mode: read a batch of prompts' blocks from the pool on every rank; per load, how many leading
# blocks every rank read (the engine core's executor.load_from_pool)
PoolReader = Callable[[list[PoolLoad]], list[int]]


@dataclass
class _Incoming:
    request: Request
    handle: TransferHandle
    deadline: float  # admission deadline while waiting, then the receive deadline
    sent_at: float = 0.0
    done: KVDone | None = None  # storage mode: KVDone came, the read waits for host blocks
    unreadable: str | None = None  # storage mode: why the blocks cannot be read at all


class DecodeSide:
    def __init__(
        self,
        kv: KVCacheManager,
        scheduler: Scheduler,
        control: ControlChannel,
        regions: list[list[KVRegion]],
        fingerprint: str,
        tp_size: int,
        bytes_per_block: int,
        config: DisaggConfig,
        clock: Callable[[], float] = time.monotonic,
        read_pool: PoolReader | None = None,
    ) -> None:
        if config.is_storage and read_pool is None:
            raise ValueError("storage mode needs a pool reader")
        self.kv = kv
        self.read_pool = read_pool
        self.scheduler = scheduler
        self.control = control
        self.regions = regions
        self.fingerprint = fingerprint
        self.tp_size = tp_size
        self.bytes_per_block = bytes_per_block  # all ranks
        self.config = config
        self.clock = clock
        self.reserve = DecodeReserve(
            kv.block_size,
            config.reserve_ratio_init,
            config.reserve_ratio_min,
            config.reserve_ratio_decay,
            config.reserve_clip,
        )
        self.stats = TransferStats()
        self.waiting: deque[_Incoming] = deque()
        self.receiving: dict[str, _Incoming] = {}  # room -> admitted, blocks allocated, KVDest sent
        self._by_req: dict[str, _Incoming] = {}
        # blocks of rooms given up while P may still be writing them: held until P acknowledges the
        # KVAbort or QUARANTINE_SECONDS pass, so a late write never lands in another request's blocks
        self._quarantine: dict[str, float] = {}
        self._parked: list[_Incoming] = []  # admitted; KVDest waits for a step to run pending cache ops
        self._to_read: list[_Incoming] = []  # storage mode: KVDone came, no host blocks to read into yet
        self._num_preemptions = scheduler.stats.num_preemptions

    def add(self, request: Request, handle: TransferHandle) -> None:
        if handle.room in self.receiving or any(i.handle.room == handle.room for i in self.waiting):
            raise ValueError(f"transfer room {handle.room!r} is already in use on this decode instance")
        if request.req_id in self._by_req or request.req_id in self.scheduler.requests:
            raise ValueError(f"request id {request.req_id!r} is already in use")
        incoming = _Incoming(request, handle, self.clock() + self.config.admission_timeout)
        self.waiting.append(incoming)
        self._by_req[request.req_id] = incoming

    # ---- admission -----------------------------------------------------------------

    def reserve_blocks(self, candidate: Request | None = None) -> int:
        """Blocks kept back for the future tokens of running requests, of those receiving their KV, and of
        `candidate` (a request being admitted, whose prompt blocks are allocated with it)."""
        kv = self.kv
        running = [
            Reservee(r.num_tokens, r.sampling.max_tokens - len(r.output_token_ids), len(kv.block_ids(r.req_id)))
            for r in self.scheduler.running
        ]
        running += [
            Reservee(i.request.num_prompt_tokens, i.request.sampling.max_tokens, len(kv.block_ids(i.request.req_id)))
            for i in self.receiving.values()
        ]
        if candidate is not None:
            running.append(
                Reservee(
                    candidate.num_prompt_tokens,
                    candidate.sampling.max_tokens,
                    math.ceil(candidate.num_prompt_tokens / kv.block_size),
                )
            )
        return self.reserve.num_blocks(running)

    def admit(self) -> list[RequestUpdate]:
        """Admit waiting requests FIFO while their blocks fit beside the reserve; fail expired ones."""
        if self.scheduler.stats.num_preemptions != self._num_preemptions:
            self._num_preemptions = self.scheduler.stats.num_preemptions
            self.reserve.on_preemption()
        failed: list[RequestUpdate] = self.read_from_pool() if self._to_read else []
        now = self.clock()
        for incoming in self._parked:  # the step that ran their blocks' pending copies is over
            self._send_dest(incoming)
        self._parked = []
        while self.waiting:
            incoming = self.waiting[0]
            request = incoming.request
            room_for_seq = len(self.scheduler.running) + len(self.receiving) < self.scheduler.config.max_num_seqs
            if room_for_seq and self.kv.allocate_slots(
                request, request.num_prompt_tokens, reserve=self.reserve_blocks(request)
            ):
                self.waiting.popleft()
                self.receiving[incoming.handle.room] = incoming
                incoming.deadline = self.clock() + self.config.transfer_timeout
                if self.kv.has_pending_ops:
                    # evicted blocks are being saved to the host tier: P may write them only once the step
                    # carrying those copies has run (the next admit())
                    self._parked.append(incoming)
                else:
                    self._send_dest(incoming)
                continue
            break
        for incoming in [i for i in self.waiting if now > i.deadline]:
            self.waiting.remove(incoming)
            self.control.send(incoming.handle.peer, KVAbort(room=incoming.handle.room, reason="no capacity on decode"))
            failed.append(
                self._fail(
                    incoming,
                    RequestError(
                        503,
                        "no_capacity",
                        f"the decode instance had no room for {incoming.request.num_prompt_tokens} "
                        f"prompt tokens within {self.config.admission_timeout:.0f}s; retry later or add decode capacity",
                    ),
                )
            )
        return failed

    def _send_dest(self, incoming: _Incoming) -> None:
        request = incoming.request
        incoming.sent_at = self.clock()
        dest = KVDest(
            room=incoming.handle.room,
            block_ids=list(self.kv.block_ids(request.req_id)),
            regions=self.regions,
            fingerprint=self.fingerprint,
            tp_size=self.tp_size,
            num_prompt_tokens=request.num_prompt_tokens,
            prompt_digest=prompt_digest(request.prompt_token_ids),
            reply_to=self.control.address,
            load_failure_policy=self.config.kv_load_failure_policy,
        )
        if self.config.fault_delay_ms:  # testing only: KVDest arrives at a random point of P's prefill
            import random

            time.sleep(random.uniform(0, self.config.fault_delay_ms) / 1000)
        self.control.send(incoming.handle.peer, dest)
        logger.debug(
            "request %s: %d blocks allocated, KVDest sent to %s",
            request.req_id,
            len(dest.block_ids),
            incoming.handle.peer,
        )

    # ---- KV arrives ------------------------------------------------------------------

    def on_control(self, message: KVDone | KVAbort) -> list[RequestUpdate]:
        if message.room in self._quarantine:  # P has let go of the room
            del self._quarantine[message.room]
            self.kv.release(f"quarantine:{message.room}")
            return []
        incoming = self.receiving.get(message.room)
        if incoming is None:
            logger.debug("dropping %s for unknown room %s", type(message).__name__, message.room)
            return []
        expected = incoming.handle.peer_incarnation
        if expected and message.incarnation != expected:
            logger.warning(
                "dropping %s for room %s from a stale prefill instance (%s, expected %s)",
                type(message).__name__,
                message.room,
                message.incarnation,
                expected,
            )
            return []
        if isinstance(message, KVAbort):
            return [
                self._fail(
                    incoming,
                    RequestError(502, "kv_transfer_failed", f"the prefill instance aborted: {message.reason}"),
                    False,
                )
            ]
        if self.config.is_storage and (message.status == "ok" or message.code == WRITE_FAILED):
            incoming.done = message
            self._to_read.append(incoming)
            return self.read_from_pool()
        if message.status != "ok":
            return [
                self._fail(
                    incoming,
                    RequestError(
                        502,
                        message.code or "kv_transfer_failed",
                        f"the prefill instance failed the KV transfer: {message.error}",
                    ),
                    False,
                )
            ]
        num_blocks = math.ceil(incoming.request.num_prompt_tokens / self.kv.block_size)
        self.stats.bytes_received += num_blocks * self.bytes_per_block
        return [self._start(incoming, message, num_blocks)]

    def _start(self, incoming: _Incoming, message: KVDone, num_blocks: int) -> RequestUpdate:
        """The first `num_blocks` prompt blocks are (or will be, before the next forward) in the request's
        blocks: decode it, or with some missing, prefill the rest here."""
        del self.receiving[incoming.handle.room]
        del self._by_req[incoming.request.req_id]
        request = incoming.request
        request.num_computed_tokens = min(request.num_prompt_tokens, num_blocks * self.kv.block_size)
        self.kv.cache_computed(request)
        self.stats.observe(self.clock() - incoming.sent_at)
        logger.info("request %s: KV of %d blocks received (room %s)", request.req_id, num_blocks, message.room)
        if request.num_computed_tokens < request.num_prompt_tokens:
            update = self.scheduler.add_computed(request, None)
            return RequestUpdate(update.request, [])
        return self.scheduler.add_computed(request, message.first_token, message.logprobs)

    # ---- storage mode: the prompt's blocks from the pool --------------------------------

    def read_from_pool(self) -> list[RequestUpdate]:
        """Read the blocks of every request whose KVDone came, as far as the host tier has room (the rest
        wait for the next step, within their receive deadline); start or fail each."""
        assert self.read_pool is not None
        pending, self._to_read = self._to_read, []
        loads: list[tuple[_Incoming, PoolLoad]] = []
        for incoming in pending:
            message = incoming.done
            assert message is not None
            if message.status != "ok":  # P wrote nothing
                continue
            num_blocks = math.ceil(incoming.request.num_prompt_tokens / self.kv.block_size)
            if num_blocks > self.kv.num_host_blocks:
                incoming.unreadable = (
                    f"the prompt's {num_blocks} blocks do not fit in this decode instance's host "
                    f"tier ({self.kv.num_host_blocks} blocks), which stages pool reads; raise "
                    "--host-kv-cache-memory"
                )
                continue
            load = self.kv.plan_prompt_load(incoming.request)
            if load is None:
                self._to_read.append(incoming)
            else:
                loads.append((incoming, load))
        started = self.clock()
        num_read = self.read_pool([load for _, load in loads]) if loads else []
        if loads:
            self.stats.pool_seconds_get += self.clock() - started
        read = {id(incoming): (load, n) for (incoming, load), n in zip(loads, num_read)}
        updates = []
        for incoming in pending:
            if incoming in self._to_read:
                continue
            load_n = read.get(id(incoming))
            updates.append(self._on_read(incoming, *(load_n if load_n is not None else (None, 0))))
        return updates

    def _on_read(self, incoming: _Incoming, load: PoolLoad | None, num_read: int) -> RequestUpdate:
        message = incoming.done
        assert message is not None
        request = incoming.request
        num_blocks = math.ceil(request.num_prompt_tokens / self.kv.block_size)
        self.stats.bytes_received += num_read * self.bytes_per_block
        policy = self.config.kv_load_failure_policy
        if num_read == num_blocks or policy == "recompute":
            if load is not None:
                self.kv.finish_prompt_load(request, load, num_read)
            if num_read < num_blocks:
                self.stats.fail("load_failed")
                self.stats.num_load_recomputes += 1
                self.stats.num_recomputed_tokens += request.num_prompt_tokens - num_read * self.kv.block_size
                logger.warning(
                    "request %s: %d of %d prompt blocks missing from the KV pool (%s); prefilling "
                    "them here (--kv-load-failure-policy recompute)",
                    request.req_id,
                    num_blocks - num_read,
                    num_blocks,
                    self._why_missing(incoming),
                )
            return self._start(incoming, message, num_read)
        if load is not None:
            self.kv.finish_prompt_load(request, load, 0)
        return self._fail(
            incoming,
            RequestError(
                502,
                "kv_load_failed",
                f"{num_blocks - num_read} of the prompt's {num_blocks} KV blocks were missing "
                f"from the KV pool or could not be read ({self._why_missing(incoming)}); retry the request, or run the "
                "decode instance with --kv-load-failure-policy recompute to prefill missing blocks there",
            ),
            False,
        )

    def _why_missing(self, incoming: _Incoming) -> str:
        message = incoming.done
        assert message is not None
        if incoming.unreadable is not None:
            return incoming.unreadable
        if message.status != "ok":
            return message.error
        if message.tp_size and message.tp_size != self.tp_size:
            return (
                f"they were written by a prefill instance with TP size {message.tp_size}, and this decode "
                f"instance runs TP size {self.tp_size}: each rank reads its own objects"
            )
        if message.fingerprint and message.fingerprint != self.fingerprint:
            return "they were written by a prefill instance with another model, dtype, block size or layout"
        return "evicted, or the pool failed: see pdserve_kv_store_errors_total"

    # ---- failures and the end --------------------------------------------------------

    def expire(self) -> list[RequestUpdate]:
        now = self.clock()
        for room, until in list(self._quarantine.items()):
            if now > until:
                del self._quarantine[room]
                self.kv.release(f"quarantine:{room}")
        failed = []
        for incoming in [i for i in self.receiving.values() if now > i.deadline]:
            failed.append(
                self._fail(
                    incoming,
                    RequestError(
                        502,
                        "kv_transfer_timeout",
                        f"the KV cache did not arrive from the prefill instance within "
                        f"{self.config.transfer_timeout:.0f}s",
                    ),
                )
            )
        return failed

    def abort(self, req_id: str) -> bool:
        """Drop a request still waiting for admission or KV; True if it was here."""
        incoming = self._by_req.get(req_id)
        if incoming is None:
            return False
        self._remove(incoming, "aborted on decode")
        return True

    def _fail(self, incoming: _Incoming, error: RequestError, peer_may_write: bool = True) -> RequestUpdate:
        self.stats.fail(
            {"kv_transfer_timeout": "timeout", "no_capacity": "no_capacity", "kv_load_failed": "load_failed"}.get(
                error.code, "peer_error"
            )
        )
        logger.warning("request %s failed: %s", incoming.request.req_id, error.message)
        self._remove(incoming, error.code if peer_may_write else None)
        return RequestUpdate(incoming.request, [], finished=True, error=error)

    def _remove(self, incoming: _Incoming, abort_reason: str | None) -> None:
        """Forget the request and free its blocks; if P may still write them (abort_reason given), tell P
        and quarantine them."""
        request = incoming.request
        room = incoming.handle.room
        if abort_reason is not None and room in self.receiving:
            self.control.send(incoming.handle.peer, KVAbort(room=room, reason=abort_reason))
            if not self.config.is_storage:  # in storage mode P never writes these blocks
                self.kv.hold(f"quarantine:{room}", request.req_id)
                self._quarantine[room] = self.clock() + min(QUARANTINE_SECONDS, self.config.transfer_timeout)
        self.receiving.pop(room, None)
        if incoming in self._parked:
            self._parked.remove(incoming)
        if incoming in self._to_read:
            self._to_read.remove(incoming)
        if incoming in self.waiting:
            self.waiting.remove(incoming)
        self._by_req.pop(request.req_id, None)
        self.kv.free(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = FinishReason.ABORT

    def on_step(self) -> None:
        self.reserve.on_step()

    @property
    def num_pending(self) -> int:
        return len(self.waiting) + len(self.receiving) + len(self._quarantine)
