"""P's control plane: which blocks of which request go to which D blocks, in which step.

The engine core alone learns KVDest (D's block ids), so every send is decided here and broadcast in
the step plan (see DESIGN.md, the multi-rank invariant). For a request scheduled in a step that
computes prompt tokens [start, end), blocks [sent, start // bs) already computed go first as a
catch-up; blocks completed by this step go layer by layer (the last, partial block only with the last
chunk). A request whose prefill ends before its KVDest arrived keeps its blocks (a hold) until they are
caught up. KVDone goes to D once every rank has confirmed every block. Pure Python: no tensors.

Storage mode: no KVDest is awaited before the prefill. The step that computes a prompt's last chunk also
writes all its blocks to the pool (PoolSend: staged into host blocks after the forward, put by every
rank). Once every rank confirmed and KVDest has come, KVDone goes to D. A failed write does not fail the
request here: KVDone tells D (code kv_store_write_failed), whose --kv-load-failure-policy decides.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pdserve.disagg.control import ControlChannel, layout_mismatch, prompt_digest
from pdserve.disagg.counters import TransferStats
from pdserve.kvcache.manager import KVCacheManager
from pdserve.messages import ForwardOutput, KVAbort, KVDest, KVDone, KVSend, PoolSend, StepPlan, TransferHandle
from pdserve.request import Request
from pdserve.scheduler.scheduler import RequestError, SchedulerOutput

logger = logging.getLogger(__name__)

WRITE_FAILED = "kv_store_write_failed"
ABORTED_BY_DECODE = "aborted_by_decode"  # P's error when D gave a request up (D's own answer is the client's)  # KVDone code: P could not write the prompt's blocks to the pool


@dataclass
class _Outgoing:
    request: Request
    handle: TransferHandle
    deadline: float
    release_at: float = 0.0  # when it is scheduled even without KVDest
    is_scheduled: bool = False
    dest: KVDest | None = None
    num_sent: int = 0  # leading blocks planned (and, once their step returned, confirmed) to D
    first_token: int | None = None
    logprobs: list[tuple[int, float]] | None = None
    held: list[int] | None = None  # block ids kept after the request finished
    started: float | None = None
    num_bytes: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    is_staged: bool = False  # storage mode: its pool write is in a plan
    is_written: bool = False  # storage mode: every rank wrote every block
    write_error: str | None = None  # storage mode: why the write failed

    @property
    def room(self) -> str:
        return self.handle.room


class PrefillSide:
    def __init__(
        self,
        kv: KVCacheManager,
        control: ControlChannel,
        fingerprint: str,
        tp_size: int,
        transfer_timeout: float,
        clock: Callable[[], float] = time.monotonic,
        dest_wait: float = 0.0,
        storage: bool = False,
    ) -> None:
        self.kv = kv
        self.storage = storage
        self.control = control
        self.fingerprint = fingerprint
        self.tp_size = tp_size
        self.timeout = transfer_timeout
        self.dest_wait = dest_wait
        self.clock = clock
        self.stats = TransferStats()
        self._by_room: dict[str, _Outgoing] = {}
        self._by_req: dict[str, _Outgoing] = {}
        self._early: dict[str, tuple[KVDest, float]] = {}  # KVDest that came before its request
        self._deferred: list[tuple[str, RequestError]] = []  # failures found in add(), reported by expire()

    # ---- requests and messages in ----------------------------------------------------

    def add(self, request: Request, handle: TransferHandle) -> None:
        """Track a request's transfer; a bad early KVDest fails it with the next expire()."""
        if handle.room in self._by_room:
            raise ValueError(f"transfer room {handle.room!r} is already in use on this prefill instance")
        if request.req_id in self._by_req:
            raise ValueError(f"request id {request.req_id!r} is already in use")
        now = self.clock()
        out = _Outgoing(request, handle, now + self.timeout, release_at=now + (0.0 if self.storage else self.dest_wait))
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

    def _attach(self, out: _Outgoing, dest: KVDest) -> list[tuple[str, RequestError]]:
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
        if problem is None and len(dest.block_ids) < math.ceil(request.num_prompt_tokens / self.kv.block_size):
            problem = f"the decode instance allocated {len(dest.block_ids)} blocks, too few for the prompt"
        if problem is not None:
            return self._fail(out, "kv_transfer_failed", problem, reply_to=dest.reply_to)
        out.dest = dest
        logger.debug("room %s: KVDest with %d blocks", out.room, len(dest.block_ids))
        if self.storage:
            self._complete_written(out)
        return []

    def take_ready(self) -> list[Request]:
        """Requests to schedule now: those whose KVDest is here (so every block can go layer by layer), and
        those that waited `dest_wait` for it (their early blocks are caught up once it comes)."""
        now = self.clock()
        ready = []
        for out in self._by_room.values():
            if not out.is_scheduled and (out.dest is not None or now >= out.release_at):
                out.is_scheduled = True
                ready.append(out.request)
        return ready

    # ---- one step ------------------------------------------------------------------

    def plan_sends(self, sched: SchedulerOutput) -> list[KVSend]:
        """This step's sends, in plan order: per scheduled request a catch-up then its layer-wise blocks;
        then catch-ups of requests whose prefill is over. Marks the blocks as sent."""
        sends: list[KVSend] = []
        bs = self.kv.block_size
        for seq in sched.plan.seqs:
            out = self._by_req.get(seq.req_id)
            if out is None or out.dest is None:
                continue
            start, end = seq.start_pos, seq.start_pos + len(seq.token_ids)
            ready = start // bs
            last = math.ceil(end / bs) if end >= out.request.num_prompt_tokens else end // bs
            self._add_send(sends, out, seq.block_ids, min(ready, last), layerwise=False)
            self._add_send(sends, out, seq.block_ids, last, layerwise=True)
        scheduled = {seq.req_id for seq in sched.plan.seqs}
        for out in self._by_room.values():
            if out.held is not None and out.dest is not None and out.request.req_id not in scheduled:
                self._add_send(sends, out, out.held, math.ceil(out.request.num_prompt_tokens / bs), layerwise=False)
        return sends

    def plan_pool_sends(self, sched: SchedulerOutput) -> list[PoolSend]:
        """Storage mode: pool writes of the prompts whose last chunk this step computes, and of held prompts
        the host tier had no room for before."""
        sends: list[PoolSend] = []
        for seq in sched.plan.seqs:
            out = self._by_req.get(seq.req_id)
            if (
                out is not None
                and not out.is_staged
                and seq.start_pos + len(seq.token_ids) >= out.request.num_prompt_tokens
            ):
                self._stage(sends, out, seq.block_ids)
        scheduled = {seq.req_id for seq in sched.plan.seqs}
        for out in self._by_room.values():
            if out.held is not None and not out.is_staged and out.request.req_id not in scheduled:
                self._stage(sends, out, out.held)
        return sends

    def _stage(self, sends: list[PoolSend], out: _Outgoing, block_ids: list[int]) -> None:
        num_blocks = math.ceil(out.request.num_prompt_tokens / self.kv.block_size)
        if num_blocks > self.kv.num_host_blocks:  # it would never fit: fail the write now, D's policy decides
            out.is_staged = True
            out.write_error = (
                f"the prompt's {num_blocks} blocks do not fit in the prefill instance's host tier "
                f"({self.kv.num_host_blocks} blocks), which stages pool writes; raise "
                "--host-kv-cache-memory"
            )
            self.stats.fail("write_error")
            logger.warning("request %s: %s", out.request.req_id, out.write_error)
            return
        host_ids = self.kv.stage_prompt(out.request)
        if host_ids is None:  # the host tier is busy this step: the blocks are held and staged in a later one
            return
        sends.append(
            PoolSend(
                room=out.room,
                device_block_ids=block_ids[: len(host_ids)],
                host_block_ids=host_ids,
                keys=self.kv.prompt_object_keys(out.request),
            )
        )
        out.is_staged = True
        out.started = self.clock()

    def _add_send(self, sends: list[KVSend], out: _Outgoing, block_ids: list[int], end: int, layerwise: bool) -> None:
        assert out.dest is not None
        if end <= out.num_sent:
            return
        sends.append(
            KVSend(
                room=out.room,
                regions=out.dest.regions,
                src_block_ids=block_ids[out.num_sent : end],
                dst_block_ids=out.dest.block_ids[out.num_sent : end],
                layerwise=layerwise,
            )
        )
        out.num_sent = end
        if out.started is None:
            out.started = self.clock()

    def on_output(self, plan: StepPlan, output: ForwardOutput) -> list[tuple[str, RequestError]]:
        """After the step ran, before the scheduler frees finished requests: take first tokens, hold blocks
        still to send, report send failures, and send KVDone for transfers that are complete."""
        failed: list[tuple[str, RequestError]] = []
        for report in output.kv_sent:
            for room, error in report.failed.items():
                out = self._by_room.get(room)
                if out is not None:
                    out.failures[f"rank{report.rank}"] = f"rank {report.rank}: {error}"
            self.stats.bytes_sent += report.num_bytes
            if report.rank == 0 and self.storage:
                self.stats.pool_seconds_put += report.seconds_busy
            elif report.rank == 0:
                self.stats.send_seconds_busy += report.seconds_busy
                self.stats.send_seconds_exposed += report.seconds_exposed
        sampled = dict(zip(output.req_ids, range(len(output.req_ids))))
        for seq in plan.seqs:
            out = self._by_req.get(seq.req_id)
            index = sampled.get(seq.req_id)
            if out is None or index is None:
                continue
            out.first_token = output.token_ids[index]
            out.logprobs = list(output.logprobs[index]) if output.logprobs is not None else None
        if self.storage:
            self._on_pool_output({send.room for send in plan.pool_sends})
            return failed
        for out in list(self._by_room.values()):
            if out.failures:
                failed += self._fail(out, "kv_transfer_failed", "; ".join(out.failures.values()))
            elif (
                out.first_token is not None
                and out.dest is not None
                and out.num_sent >= math.ceil(out.request.num_prompt_tokens / self.kv.block_size)
            ):
                self._complete(out)
            elif out.first_token is not None and out.held is None:
                out.held = self.kv.hold(f"send:{out.room}", out.request.req_id)
        return failed

    def _on_pool_output(self, written: set[str]) -> None:
        """Storage mode, after a step: the rooms whose write ran are written (or failed); hold the blocks of
        prompts not staged yet; send KVDone where KVDest is here."""
        for out in list(self._by_room.values()):
            if out.room in written:
                if out.failures:
                    out.write_error = "; ".join(out.failures.values())
                    self.stats.fail("write_error")
                    logger.warning(
                        "request %s: KV write to the pool failed (room %s): %s",
                        out.request.req_id,
                        out.room,
                        out.write_error,
                    )
                else:
                    out.is_written = True
                    self.kv.note_in_pool(
                        self.kv.keys_for(out.request)[: out.request.num_prompt_tokens // self.kv.block_size]
                    )
                if out.held is not None:
                    self.kv.release(f"send:{out.room}")
                    out.held = None
            elif out.first_token is not None and not out.is_staged and out.held is None:
                out.held = self.kv.hold(f"send:{out.room}", out.request.req_id)
                # the pool send to come writes these blocks: the request's finish must not write them through
                self.kv.note_in_pool(
                    self.kv.keys_for(out.request)[: out.request.num_prompt_tokens // self.kv.block_size]
                )
            self._complete_written(out)

    def _complete_written(self, out: _Outgoing) -> None:
        """Storage mode: tell D once the write is over (either way), the first token is known and KVDest came."""
        if out.dest is None or out.first_token is None or not (out.is_written or out.write_error is not None):
            return
        if out.write_error is not None:
            num_blocks = math.ceil(out.request.num_prompt_tokens / self.kv.block_size)
            self.control.send(
                out.dest.reply_to,
                KVDone(
                    room=out.room,
                    status="error",
                    code=WRITE_FAILED,
                    first_token=out.first_token,
                    logprobs=out.logprobs,
                    error=f"the prefill instance could not write the prompt's {num_blocks} blocks to the KV pool: "
                    f"{out.write_error}",
                    tp_size=self.tp_size,
                    fingerprint=self.fingerprint,
                ),
            )
            self._drop(out)
            return
        self._complete(out)

    def _complete(self, out: _Outgoing) -> None:
        assert out.dest is not None and out.first_token is not None
        self.control.send(
            out.dest.reply_to,
            KVDone(
                room=out.room,
                first_token=out.first_token,
                logprobs=out.logprobs,
                tp_size=self.tp_size,
                fingerprint=self.fingerprint,
            ),
        )
        if out.started is not None:
            self.stats.observe(self.clock() - out.started)
        logger.info(
            "request %s: KV of %d blocks %s (room %s)",
            out.request.req_id,
            math.ceil(out.request.num_prompt_tokens / self.kv.block_size),
            "in the pool, KVDone sent to " + out.dest.reply_to if self.storage else "sent to " + out.dest.reply_to,
            out.room,
        )
        self._drop(out)

    # ---- failures and the end ------------------------------------------------------

    def _fail(
        self, out: _Outgoing, code: str, message: str, reply_to: str | None = None
    ) -> list[tuple[str, RequestError]]:
        reply_to = reply_to or (out.dest.reply_to if out.dest is not None else None)
        if reply_to:
            self.control.send(reply_to, KVDone(room=out.room, status="error", error=message, code=code))
        self.stats.fail("send_error" if code == "kv_transfer_failed" else "timeout")
        logger.warning("request %s: KV transfer failed (room %s): %s", out.request.req_id, out.room, message)
        self._drop(out)
        return [(out.request.req_id, RequestError(502, code, message))]

    def _drop(self, out: _Outgoing) -> None:
        self._by_room.pop(out.room, None)
        self._by_req.pop(out.request.req_id, None)
        if out.held is not None:
            self.kv.release(f"send:{out.room}")
            out.held = None

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
    def has_sends(self) -> bool:
        """Held blocks that can be sent now (a step with no tokens must run for them)."""
        if self.storage:
            return any(out.held is not None and not out.is_staged for out in self._by_room.values())
        return any(out.held is not None and out.dest is not None for out in self._by_room.values())

    @property
    def num_pending(self) -> int:
        return len(self._by_room)

    def check_integrity(self) -> None:
        for out in self._by_room.values():
            if out.num_sent > len(out.dest.block_ids if out.dest else []):
                raise AssertionError(f"room {out.room} sent more blocks than D allocated")
