"""D's control plane: admit with a reserve, tell P where to write (KVDest), start decoding on KVDone.

A request with a transfer handle waits here, not in the scheduler's queue: D never prefills it. It is
admitted FIFO when its prompt's blocks fit beside the reserve for the future decode tokens of the
requests already running (disagg.reserve); then D sends KVDest to P and starts a receive deadline.
KVDone hands it to the scheduler with its prompt computed and P's first token appended. No capacity
within the admission timeout: 503 no_capacity. No KVDone by the deadline: 502 kv_transfer_timeout.
Pure Python: no tensors (P's ranks write the blocks; D's CPU does nothing per block).

The request itself is parked in the scheduler (its lifecycle's one owner) from add() until KVDone starts
it (`Scheduler.add_computed`) or a failure ends it (`Scheduler.finish_parked`); this module keeps only the
protocol state: admission order, rooms, deadlines, quarantines. What KVDone means is the transfer mode's:
`DirectDecode` (disagg.direct: the blocks are in place) or `StorageDecode` (disagg.storage: read them from
the pool first).
"""

from __future__ import annotations

import logging
import math
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pdserve.config import DisaggConfig
from pdserve.disagg.control import ControlChannel, prompt_digest
from pdserve.disagg.counters import TransferStats
from pdserve.disagg.reserve import DecodeReserve, Reservee
from pdserve.kvcache.manager import KVCacheManager
from pdserve.messages import KVAbort, KVDest, KVDone, KVRegion, TransferHandle
from pdserve.request import FinishReason, Request
from pdserve.scheduler.scheduler import RequestError, RequestUpdate, Scheduler

if TYPE_CHECKING:
    from pdserve.disagg.role import RoleContext

logger = logging.getLogger(__name__)


QUARANTINE_SECONDS = 5.0


@dataclass
class Incoming:
    """One request's transfer as D sees it."""

    request: Request
    handle: TransferHandle
    deadline: float  # admission deadline while waiting, then the receive deadline
    sent_at: float = 0.0
    done: KVDone | None = None  # storage mode: KVDone came, the read waits for host blocks
    unreadable: str | None = None  # storage mode: why the blocks cannot be read at all


class DecodeSide(ABC):
    """Admission, KVDest, deadlines, aborts and quarantines, for every transfer mode; the mode implements
    `_on_done` (what an ok or failed KVDone means) and may hook the start of admission and a removal."""

    quarantines = False  # the mode's P may still write a given-up room's blocks: hold them a while

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
    ) -> None:
        self.kv = kv
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
        self.waiting: deque[Incoming] = deque()
        self.receiving: dict[str, Incoming] = {}  # room -> admitted, blocks allocated, KVDest sent
        self._by_req: dict[str, Incoming] = {}
        # blocks of rooms given up while P may still be writing them: held until P acknowledges the
        # KVAbort or QUARANTINE_SECONDS pass, so a late write never lands in another request's blocks
        self._quarantine: dict[str, float] = {}
        self._parked: list[Incoming] = []  # admitted; KVDest waits for a step to run pending cache ops
        scheduler.preemption_listeners.append(self.on_preemption)

    @classmethod
    def create(cls, ctx: RoleContext, control: ControlChannel, config: DisaggConfig) -> DecodeSide:
        return cls(
            ctx.kv, ctx.scheduler, control, ctx.regions, ctx.fingerprint, ctx.tp_size, ctx.bytes_per_block, config
        )

    # ---- what a mode decides ---------------------------------------------------------

    @abstractmethod
    def _on_done(self, incoming: Incoming, message: KVDone) -> list[RequestUpdate]:
        """KVDone (ok or not) for a room being received, from the right incarnation of P."""

    def _before_admit(self) -> list[RequestUpdate]:
        """Work left from earlier steps, before admission (storage: deferred pool reads)."""
        return []

    def _forget(self, incoming: Incoming) -> None:  # noqa: B027 - optional hook
        """`incoming` is being removed: drop it from the mode's own lists."""

    def add(self, request: Request, handle: TransferHandle) -> None:
        if handle.room in self.receiving or any(i.handle.room == handle.room for i in self.waiting):
            raise ValueError(f"transfer room {handle.room!r} is already in use on this decode instance")
        if request.req_id in self._by_req:
            raise ValueError(f"request id {request.req_id!r} is already in use")
        self.scheduler.park(request)  # raises if the id is in use there
        incoming = Incoming(request, handle, self.clock() + self.config.admission_timeout)
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
        failed = self._before_admit()
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

    def _send_dest(self, incoming: Incoming) -> None:
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
        return self._on_done(incoming, message)

    def _start(self, incoming: Incoming, message: KVDone, num_blocks: int) -> RequestUpdate:
        """The first `num_blocks` prompt blocks are (or will be, before the next forward) in the request's
        blocks: decode it, or with some missing, prefill the rest here."""
        del self.receiving[incoming.handle.room]
        del self._by_req[incoming.request.req_id]
        request = incoming.request
        request.num_computed_tokens = min(request.num_prompt_tokens, num_blocks * self.kv.block_size)
        self.kv.cache_computed(request)
        self.stats.observe(self.clock() - incoming.sent_at)
        logger.info("request %s: KV of %d blocks received (room %s)", request.req_id, num_blocks, message.room)
        request.num_cached_tokens = message.num_cached_tokens
        if request.num_computed_tokens < request.num_prompt_tokens:
            update = self.scheduler.add_computed(request, None)
            return RequestUpdate(update.request, [])
        return self.scheduler.add_computed(request, message.first_token, message.logprobs)

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

    def _fail(self, incoming: Incoming, error: RequestError, peer_may_write: bool = True) -> RequestUpdate:
        self.stats.fail(
            {"kv_transfer_timeout": "timeout", "no_capacity": "no_capacity", "kv_load_failed": "load_failed"}.get(
                error.code, "peer_error"
            )
        )
        logger.warning("request %s failed: %s", incoming.request.req_id, error.message)
        self._remove(incoming, error.code if peer_may_write else None)
        return RequestUpdate(incoming.request, [], finished=True, error=error)

    def _remove(self, incoming: Incoming, abort_reason: str | None) -> None:
        """Forget the request and free its blocks; if P may still write them (abort_reason given), tell P
        and quarantine them."""
        request = incoming.request
        room = incoming.handle.room
        if abort_reason is not None and room in self.receiving:
            self.control.send(incoming.handle.peer, KVAbort(room=room, reason=abort_reason))
            if self.quarantines:
                self.kv.hold(f"quarantine:{room}", request.req_id)
                self._quarantine[room] = self.clock() + min(QUARANTINE_SECONDS, self.config.transfer_timeout)
        self.receiving.pop(room, None)
        if incoming in self._parked:
            self._parked.remove(incoming)
        self._forget(incoming)
        if incoming in self.waiting:
            self.waiting.remove(incoming)
        self._by_req.pop(request.req_id, None)
        self.scheduler.finish_parked(request, FinishReason.ABORT)

    def on_step(self) -> None:
        """An executed step: the reserve ratio decays."""
        self.reserve.on_step()

    def on_preemption(self, request: Request | None = None) -> None:
        """The scheduler preempted a running request: the reserve was too small, reset it."""
        self.reserve.on_preemption()

    @property
    def num_pending(self) -> int:
        return len(self.waiting) + len(self.receiving) + len(self._quarantine)
