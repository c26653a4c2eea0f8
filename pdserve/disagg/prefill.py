"""P's control plane: the protocol state of every outgoing transfer, as an explicit state machine.

The engine core alone learns KVDest (D's block ids), so every send is decided here and broadcast in the
step plan (see docs/architecture.md, the multi-rank invariant). What moves the blocks is the transfer
mode, a subclass: `DirectPrefill` (disagg.direct: layer-wise writes into D's blocks) or `StoragePrefill`
(disagg.storage: a write of the prompt's blocks to the pool). KVDone goes to D once every rank has
confirmed every block. Pure Python: no tensors. The request's own lifecycle (waiting, running, finished)
belongs to the scheduler; this module keeps only rooms, deadlines, peers and the phase below.

Phases of one transfer (`Phase`, allowed moves in `TRANSITIONS`; leaving the tables is the end, by
KVDone sent, a failure or an abort, from any phase):

    QUEUED      tracked, not in the scheduler yet. Direct: it waits for KVDest (so every block can go
                layer by layer) or at most --kv-dest-wait; storage: it leaves at once.
    PREFILLING  in the scheduler, its prompt being computed. Direct: blocks go to D as they are computed
                once KVDest is here (earlier blocks as a catch-up).
    HELD        the prefill is over (the first token is known) and the request has finished here, but
                its blocks are held because they still have to go. Direct: KVDest, or catch-up sends, are
                still to come; storage: the host tier had no room to stage the write yet.
    WRITING     storage: the pool write of the prompt's blocks is in the step plan being run.
    WRITTEN     storage: the write is over, ok or failed (`write_error`); KVDone waits for KVDest.

    QUEUED -> PREFILLING -> HELD (direct, storage) -> WRITING (storage) -> WRITTEN
                         -> WRITING -> WRITTEN      (storage, the step computing the last chunk)
              PREFILLING, HELD -> WRITTEN           (storage: the prompt can never fit the host tier)

Data that is not phase: `dest` (KVDest, may come in any phase, even before the request: `_early`),
`first_token`, `held` (the block ids referenced while HELD, and WRITING after HELD), `num_sent`.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pdserve.disagg.control import ControlChannel, layout_mismatch, prompt_digest
from pdserve.disagg.counters import TransferStats
from pdserve.kvcache.manager import KVCacheManager
from pdserve.messages import (
    ForwardOutput,
    KVAbort,
    KVDest,
    KVDone,
    KVSendReport,
    ScheduledSeq,
    StepPlan,
    TransferHandle,
)
from pdserve.request import Request
from pdserve.scheduler.scheduler import RequestError, SchedulerOutput

if TYPE_CHECKING:
    from pdserve.config import DisaggConfig
    from pdserve.disagg.role import RoleContext

logger = logging.getLogger(__name__)

WRITE_FAILED = "kv_store_write_failed"  # KVDone code: P could not write the prompt's blocks to the pool
ABORTED_BY_DECODE = "aborted_by_decode"  # P's error when D gave a request up (D's own answer is the client's)


class Phase(enum.Enum):
    QUEUED = enum.auto()
    PREFILLING = enum.auto()
    HELD = enum.auto()
    WRITING = enum.auto()
    WRITTEN = enum.auto()


TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.QUEUED: frozenset({Phase.PREFILLING}),
    Phase.PREFILLING: frozenset({Phase.HELD, Phase.WRITING, Phase.WRITTEN}),
    Phase.HELD: frozenset({Phase.WRITING, Phase.WRITTEN}),
    Phase.WRITING: frozenset({Phase.WRITTEN}),
    Phase.WRITTEN: frozenset(),
}


@dataclass
class Outgoing:
    """One request's transfer as P sees it."""

    request: Request
    handle: TransferHandle
    deadline: float  # KVDest must come by then
    release_at: float = 0.0  # QUEUED until KVDest comes or this time passes
    phase: Phase = Phase.QUEUED
    dest: KVDest | None = None
    num_sent: int = 0  # leading blocks planned (and, once their step returned, confirmed) to D
    first_token: int | None = None
    logprobs: list[tuple[int, float]] | None = None
    held: list[int] | None = None  # block ids referenced under the hold `send:<room>`
    started: float | None = None
    failures: dict[str, str] = field(default_factory=dict)  # per rank, from this step's reports
    write_error: str | None = None  # storage mode, WRITTEN: why the write failed

    @property
    def room(self) -> str:
        return self.handle.room

    def move(self, phase: Phase) -> None:
        if phase not in TRANSITIONS[self.phase]:
            raise AssertionError(f"room {self.room}: no move from {self.phase.name} to {phase.name}")
        self.phase = phase

    @property
    def is_scheduled(self) -> bool:
        return self.phase is not Phase.QUEUED

    @property
    def is_staged(self) -> bool:
        """Storage mode: its write is planned, or over."""
        return self.phase in (Phase.WRITING, Phase.WRITTEN)

    @property
    def is_written(self) -> bool:
        """Storage mode: every rank wrote every block."""
        return self.phase is Phase.WRITTEN and self.write_error is None


class PrefillSide(ABC):
    """The protocol every transfer mode shares: rooms, KVDest (early or late), deadlines, aborts, KVDone.

    The mode implements `plan` (what this step sends), `_record` (a rank's report), `_after_output` (what
    the step's end means for each transfer) and `has_sends`.
    """

    def __init__(
        self,
        kv: KVCacheManager,
        control: ControlChannel,
        fingerprint: str,
        tp_size: int,
        transfer_timeout: float,
        clock: Callable[[], float] = time.monotonic,
        dest_wait: float = 0.0,
    ) -> None:
        self.kv = kv
        self.control = control
        self.fingerprint = fingerprint
        self.tp_size = tp_size
        self.timeout = transfer_timeout
        self.dest_wait = dest_wait
        self.clock = clock
        self.stats = TransferStats()
        self._by_room: dict[str, Outgoing] = {}
        self._by_req: dict[str, Outgoing] = {}
        self._early: dict[str, tuple[KVDest, float]] = {}  # KVDest that came before its request
        self._deferred: list[tuple[str, RequestError]] = []  # failures found in add(), reported by expire()

    @classmethod
    def create(cls, ctx: RoleContext, control: ControlChannel, config: DisaggConfig) -> PrefillSide:
        return cls(
            ctx.kv, control, ctx.fingerprint, ctx.tp_size, config.transfer_timeout, dest_wait=config.kv_dest_wait
        )

    # ---- what a mode decides ---------------------------------------------------------

    @abstractmethod
    def plan(self, sched: SchedulerOutput) -> None:
        """Put this step's sends into `sched.plan`; mark what they cover."""

    @abstractmethod
    def _record(self, report: KVSendReport) -> None:
        """Count one rank's report of the step's sends in the stats."""

    @abstractmethod
    def _after_output(self, plan: StepPlan) -> list[tuple[str, RequestError]]:
        """After the first tokens are taken: complete, hold or fail each transfer; the requests to fail."""

    @property
    @abstractmethod
    def has_sends(self) -> bool:
        """Held blocks that can be sent now (a step with no tokens must run for them)."""

    def _release_delay(self) -> float:
        """How long a request stays QUEUED without KVDest."""
        return self.dest_wait

    def _on_dest(self, out: Outgoing) -> None:  # noqa: B027 - optional hook
        """KVDest was attached to `out`."""

    # ---- requests and messages in ----------------------------------------------------

    def add(self, request: Request, handle: TransferHandle) -> None:
        """Track a request's transfer; a bad early KVDest fails it with the next expire()."""
        if handle.room in self._by_room:
            raise ValueError(f"transfer room {handle.room!r} is already in use on this prefill instance")
        if request.req_id in self._by_req:
            raise ValueError(f"request id {request.req_id!r} is already in use")
        now = self.clock()
        out = Outgoing(request, handle, now + self.timeout, release_at=now + self._release_delay())
        self._by_room[handle.room] = out
        self._by_req[request.req_id] = out
        early = self._early.pop(handle.room, None)
        if early is not None:
            self._deferred += self._attach(out, early[0])

    def on_control(self, message: KVDest | KVAbort) -> list[tuple[str, RequestError]]:
        """Handle a message from D; returns requests to fail here (req_id, error)."""
        out = self._by_room.get(message.room)
        if isinstance(message, KVAbort):
            self._early.pop(message.room, None)
            if out is None:
                return []
            logger.info("room %s aborted by the decode instance (%s)", message.room, message.reason)
            if out.dest is not None:  # acknowledge: nothing more will be written, D may reuse the blocks
                self.control.send(
                    out.dest.reply_to,
                    KVDone(room=out.room, status="error", code="aborted", error="aborted by the decode instance"),
                )
            self._drop(out)
            # D gave the request up and answers its client itself (503 no_capacity, ...); the router waits for that
            return [
                (
                    out.request.req_id,
                    RequestError(499, ABORTED_BY_DECODE, f"the decode instance aborted: {message.reason}"),
                )
            ]
        if out is None:
            self._early[message.room] = (message, self.clock())
            return []
        return self._attach(out, message)

    def _attach(self, out: Outgoing, dest: KVDest) -> list[tuple[str, RequestError]]:
        problem = layout_mismatch(self.fingerprint, self.tp_size, dest.fingerprint, dest.tp_size, "prefill")
        request = out.request
        if problem is None and (
            dest.num_prompt_tokens != request.num_prompt_tokens
            or dest.prompt_digest != prompt_digest(request.prompt_token_ids)
        ):
            problem = (
                f"the decode instance has a {dest.num_prompt_tokens}-token prompt, this prefill instance "
                f"{request.num_prompt_tokens} tokens: P and D tokenized the request differently"
            )
        if problem is None and len(dest.block_ids) < self._num_prompt_blocks(out):
            problem = f"the decode instance allocated {len(dest.block_ids)} blocks, too few for the prompt"
        if problem is not None:
            return self._fail(out, "kv_transfer_failed", problem, reply_to=dest.reply_to)
        out.dest = dest
        logger.debug("room %s: KVDest with %d blocks", out.room, len(dest.block_ids))
        self._on_dest(out)
        return []

    def take_ready(self) -> list[Request]:
        """Requests to schedule now (QUEUED -> PREFILLING): those whose KVDest is here, and those that
        waited long enough for it (their early blocks are caught up once it comes)."""
        now = self.clock()
        ready = []
        for out in self._by_room.values():
            if out.phase is Phase.QUEUED and (out.dest is not None or now >= out.release_at):
                out.move(Phase.PREFILLING)
                ready.append(out.request)
        return ready

    # ---- one step ------------------------------------------------------------------

    def on_output(self, plan: StepPlan, output: ForwardOutput) -> list[tuple[str, RequestError]]:
        """After the step ran, before the scheduler frees finished requests: take first tokens, then let the
        mode hold blocks still to send, report failures, and send KVDone for transfers that are complete."""
        for report in output.kv_sent:
            for room, error in report.failed.items():
                out = self._by_room.get(room)
                if out is not None:
                    out.failures[f"rank{report.rank}"] = f"rank {report.rank}: {error}"
            self.stats.bytes_sent += report.num_bytes
            self._record(report)
        sampled = dict(zip(output.req_ids, range(len(output.req_ids))))
        for seq, out in self._in_plan(plan):
            index = sampled.get(seq.req_id)
            if index is None:
                continue
            out.first_token = output.token_ids[index]
            out.logprobs = list(output.logprobs[index]) if output.logprobs is not None else None
        return self._after_output(plan)

    def _in_plan(self, plan: StepPlan) -> Iterator[tuple[ScheduledSeq, Outgoing]]:
        """The plan's sequences that have a transfer here; being in a plan makes a QUEUED one PREFILLING."""
        for seq in plan.seqs:
            out = self._by_req.get(seq.req_id)
            if out is not None:
                if out.phase is Phase.QUEUED:
                    out.move(Phase.PREFILLING)
                yield seq, out

    def _hold(self, out: Outgoing) -> None:
        """PREFILLING -> HELD: keep the request's blocks past its end, until they are sent."""
        out.held = self.kv.hold(f"send:{out.room}", out.request.req_id)
        out.move(Phase.HELD)

    def _unhold(self, out: Outgoing) -> None:
        if out.held is not None:
            self.kv.release(f"send:{out.room}")
            out.held = None

    def _num_prompt_blocks(self, out: Outgoing) -> int:
        return math.ceil(out.request.num_prompt_tokens / self.kv.block_size)

    # ---- the end: done, failed, aborted ----------------------------------------------

    def _complete(self, out: Outgoing, where: str) -> None:
        assert out.dest is not None and out.first_token is not None
        self.control.send(
            out.dest.reply_to,
            KVDone(
                room=out.room,
                first_token=out.first_token,
                logprobs=out.logprobs,
                num_cached_tokens=out.request.num_cached_tokens,
                tp_size=self.tp_size,
                fingerprint=self.fingerprint,
            ),
        )
        if out.started is not None:
            self.stats.observe(self.clock() - out.started)
        logger.info(
            "request %s: KV of %d blocks %s%s (room %s)",
            out.request.req_id,
            self._num_prompt_blocks(out),
            where,
            out.dest.reply_to,
            out.room,
        )
        self._drop(out)

    def _fail(
        self, out: Outgoing, code: str, message: str, reply_to: str | None = None
    ) -> list[tuple[str, RequestError]]:
        reply_to = reply_to or (out.dest.reply_to if out.dest is not None else None)
        if reply_to:
            self.control.send(reply_to, KVDone(room=out.room, status="error", error=message, code=code))
        self.stats.fail("send_error" if code == "kv_transfer_failed" else "timeout")
        logger.warning("request %s: KV transfer failed (room %s): %s", out.request.req_id, out.room, message)
        self._drop(out)
        return [(out.request.req_id, RequestError(502, code, message))]

    def _drop(self, out: Outgoing) -> None:
        self._by_room.pop(out.room, None)
        self._by_req.pop(out.request.req_id, None)
        self._unhold(out)

    def abort(self, req_id: str) -> bool:
        """The request was aborted here: tell D, unless its prefill is over (then the transfer goes on).
        True if it was never scheduled (it lived only here)."""
        out = self._by_req.get(req_id)
        if out is None or out.first_token is not None:
            return False
        if out.dest is not None:
            self.control.send(
                out.dest.reply_to,
                KVDone(
                    room=out.room,
                    status="error",
                    code="kv_transfer_failed",
                    error="the prefill instance aborted the request",
                ),
            )
        self._drop(out)
        return not out.is_scheduled

    def expire(self) -> list[tuple[str, RequestError]]:
        """Fail transfers whose KVDest did not come within the timeout; forget stale early KVDests."""
        now = self.clock()
        failed, self._deferred = self._deferred, []
        for out in list(self._by_room.values()):
            if out.dest is None and now > out.deadline:
                failed += self._fail(
                    out, "kv_transfer_timeout", f"no KVDest from the decode instance within {self.timeout:.0f}s"
                )
        for room, (_, since) in list(self._early.items()):
            if now - since > self.timeout:
                del self._early[room]
        return failed

    @property
    def num_pending(self) -> int:
        return len(self._by_room)

    def check_integrity(self) -> None:
        for out in self._by_room.values():
            if out.num_sent > len(out.dest.block_ids if out.dest else []):
                raise AssertionError(f"room {out.room} sent more blocks than D allocated")
            if (out.phase is Phase.HELD and out.held is None) or (
                out.phase in (Phase.QUEUED, Phase.PREFILLING) and out.held is not None
            ):
                raise AssertionError(f"room {out.room} is {out.phase.name} with held blocks {out.held}")
