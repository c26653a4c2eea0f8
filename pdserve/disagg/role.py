"""The engine core's one handle on PD: a prefill or decode role behind a narrow interface.

The engine core calls before_step (control messages, admission, deadlines), plan (sends into the step
plan), after_step (first tokens, confirmations, KVDone) and add/abort; everything else stays in
prefill.py and decode.py.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from pdserve.config import DisaggConfig
from pdserve.disagg.control import ControlChannel
from pdserve.disagg.counters import TransferStats
from pdserve.disagg.decode import DecodeSide
from pdserve.disagg.prefill import PrefillSide
from pdserve.messages import ForwardOutput, KVAbort, KVDest, KVDone, TransferHandle
from pdserve.request import FinishReason, Request, RequestStatus
from pdserve.scheduler.scheduler import RequestError, RequestUpdate, SchedulerOutput

if TYPE_CHECKING:
    from pdserve.engine.core import EngineCore


class PDRole:
    def __init__(self, core: EngineCore, config: DisaggConfig) -> None:
        from pdserve.engine.core import bytes_per_block

        self.core = core
        self.config = config
        self.control = ControlChannel(config.control_host, config.control_port)
        tp = core.config.parallel.tensor_parallel_size
        self.prefill: PrefillSide | None = None
        self.decode: DecodeSide | None = None
        self._unscheduled: dict[str, Request] = {}  # P: waiting for KVDest (or dest_wait) before scheduling
        if config.role == "prefill":
            self.prefill = PrefillSide(
                core.kv,
                self.control,
                core.fingerprint,
                tp,
                config.transfer_timeout,
                dest_wait=config.kv_dest_wait,
                storage=config.is_storage,
            )
        else:
            self.decode = DecodeSide(
                core.kv,
                core.scheduler,
                self.control,
                core.executor.regions,
                core.fingerprint,
                tp,
                bytes_per_block(core.config, core.arch) * tp,
                config,
                read_pool=lambda loads: core.executor.load_from_pool(loads)[0],
            )

    @staticmethod
    def create(core: EngineCore, config: DisaggConfig) -> PDRole | None:
        return None if config.role == "mixed" else PDRole(core, config)

    @property
    def stats(self) -> TransferStats:
        side = self.prefill or self.decode
        assert side is not None
        return side.stats

    def add(self, request: Request, transfer: TransferHandle) -> None:
        if self.prefill is not None:
            # P computes the prompt and samples the first token; D does the rest
            request.sampling = dataclasses.replace(request.sampling, max_tokens=1, stop=[])
            if request.req_id in self.core.scheduler.requests:
                raise ValueError(f"request id {request.req_id!r} is already in use")
            self.prefill.add(request, transfer)
            self._unscheduled[request.req_id] = request
        else:
            assert self.decode is not None
            self.decode.add(request, transfer)

    def abort(self, req_id: str) -> bool:
        """True if the request lived only here (D, before its KV arrived) and is gone now."""
        if self.prefill is not None:
            if self.prefill.abort(req_id) or req_id in self._unscheduled:
                self._finish_unscheduled(req_id)
                return True
            return False
        assert self.decode is not None
        return self.decode.abort(req_id)

    def before_step(self) -> list[RequestUpdate]:
        updates: list[RequestUpdate] = []
        failed: list[tuple[str, RequestError]] = []
        for message in self.control.recv_all():
            if self.prefill is not None and isinstance(message, (KVDest, KVAbort)):
                failed += self.prefill.on_control(message)
            elif self.decode is not None and isinstance(message, (KVDone, KVAbort)):
                updates += self.decode.on_control(message)
        if self.prefill is not None:
            failed += self.prefill.expire()
        if self.decode is not None:
            updates += self.decode.expire()
            updates += self.decode.admit()
        scheduled = self.core.scheduler.requests
        for req_id, error in failed:
            if req_id in scheduled:
                updates.append(self.core.fail(req_id, error))
            elif req_id in self._unscheduled:
                updates.append(RequestUpdate(self._finish_unscheduled(req_id), [], finished=True, error=error))
        if self.prefill is not None:
            for request in self.prefill.take_ready():
                del self._unscheduled[request.req_id]
                self.core.scheduler.add_request(request)
        return updates

    def _finish_unscheduled(self, req_id: str) -> Request:
        request = self._unscheduled.pop(req_id)
        request.status = RequestStatus.FINISHED
        request.finish_reason = FinishReason.ABORT
        return request

    def plan(self, sched: SchedulerOutput) -> None:
        if self.prefill is not None and self.prefill.storage:
            sched.plan.pool_sends = self.prefill.plan_pool_sends(sched)
        elif self.prefill is not None:
            sched.plan.kv_sends = self.prefill.plan_sends(sched)

    def after_step(self, sched: SchedulerOutput, output: ForwardOutput) -> list[tuple[str, RequestError]]:
        if self.decode is not None:
            self.decode.on_step()  # the reserve ratio decays per executed step
        return self.prefill.on_output(sched.plan, output) if self.prefill is not None else []

    @property
    def has_work(self) -> bool:
        return self.prefill is not None and self.prefill.has_sends

    @property
    def num_requests_waiting(self) -> int:
        """Requests not in the scheduler yet: D's waiting for blocks or for their KV, P's waiting for KVDest."""
        if self.decode is not None:
            return len(self.decode.waiting) + len(self.decode.receiving)
        return len(self._unscheduled)

    @property
    def num_pending(self) -> int:
        side = self.prefill or self.decode
        assert side is not None
        return side.num_pending

    def close(self) -> None:
        self.control.close()
