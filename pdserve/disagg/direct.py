"""The direct transfer mode: P writes the prompt's blocks straight into D's blocks, layer by layer.

P: for a request scheduled in a step that computes prompt tokens [start, end), blocks [sent, start // bs)
already computed go first as a catch-up; blocks completed by this step go layer by layer (the last, partial
block only with the last chunk). A request whose prefill ends before its KVDest arrived keeps its blocks
(HELD) until they are caught up. D: KVDone means the blocks are in place; a room given up while P may still
write it is quarantined. Pure Python: the workers' transfer engines move the bytes (disagg.transfer).
"""

from __future__ import annotations

import math

from pdserve.disagg.decode import DecodeSide, Incoming
from pdserve.disagg.prefill import Outgoing, Phase, PrefillSide
from pdserve.messages import KVDone, KVSend, KVSendReport, StepPlan
from pdserve.scheduler.scheduler import RequestError, RequestUpdate, SchedulerOutput


class DirectPrefill(PrefillSide):
    def plan(self, sched: SchedulerOutput) -> None:
        sched.plan.kv_sends = self.plan_sends(sched)

    def plan_sends(self, sched: SchedulerOutput) -> list[KVSend]:
        """This step's sends, in plan order: per scheduled request a catch-up then its layer-wise blocks;
        then catch-ups of requests whose prefill is over. Marks the blocks as sent."""
        sends: list[KVSend] = []
        bs = self.kv.block_size
        for seq, out in self._in_plan(sched.plan):
            if out.dest is None:
                continue
            start, end = seq.start_pos, seq.start_pos + len(seq.token_ids)
            ready = start // bs
            last = math.ceil(end / bs) if end >= out.request.num_prompt_tokens else end // bs
            self._add_send(sends, out, seq.block_ids, min(ready, last), layerwise=False)
            self._add_send(sends, out, seq.block_ids, last, layerwise=True)
        scheduled = {seq.req_id for seq in sched.plan.seqs}
        for out in self._by_room.values():
            if out.phase is Phase.HELD and out.dest is not None and out.request.req_id not in scheduled:
                assert out.held is not None
                self._add_send(sends, out, out.held, self._num_prompt_blocks(out), layerwise=False)
        return sends

    def _add_send(self, sends: list[KVSend], out: Outgoing, block_ids: list[int], end: int, layerwise: bool) -> None:
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

    def _record(self, report: KVSendReport) -> None:
        if report.rank == 0:
            self.stats.send_seconds_busy += report.seconds_busy
            self.stats.send_seconds_exposed += report.seconds_exposed

    def _after_output(self, plan: StepPlan) -> list[tuple[str, RequestError]]:
        failed: list[tuple[str, RequestError]] = []
        for out in list(self._by_room.values()):
            if out.failures:
                failed += self._fail(out, "kv_transfer_failed", "; ".join(out.failures.values()))
            elif out.first_token is not None and out.dest is not None and out.num_sent >= self._num_prompt_blocks(out):
                self._complete(out, "sent to ")
            elif out.first_token is not None and out.phase is Phase.PREFILLING:
                self._hold(out)
        return failed

    @property
    def has_sends(self) -> bool:
        return any(out.phase is Phase.HELD and out.dest is not None for out in self._by_room.values())


class DirectDecode(DecodeSide):
    """P writes into the blocks D allocated; a room given up while P may still write it is quarantined."""

    quarantines = True

    def _on_done(self, incoming: Incoming, message: KVDone) -> list[RequestUpdate]:
        if message.status != "ok":
            error = RequestError(
                502,
                message.code or "kv_transfer_failed",
                f"the prefill instance failed the KV transfer: {message.error}",
            )
            return [self._fail(incoming, error, False)]
        num_blocks = math.ceil(incoming.request.num_prompt_tokens / self.kv.block_size)
        self.stats.bytes_received += num_blocks * self.bytes_per_block
        return [self._start(incoming, message, num_blocks)]
