"""An instance's PD role, a strategy behind one interface: `MixedRole` (no PD), `PrefillRole`, `DecodeRole`.

The engine core holds exactly one role and never asks which: it calls before_step (control messages,
admission, deadlines), plan (this step's sends into the step plan), after_step (first tokens,
confirmations, KVDone), add and abort. A role sees its engine only through `RoleContext` (the KV manager,
the scheduler that owns every request's lifecycle, the layout identity, and the workers' regions and pool
reader); it never reaches into the engine core. The transfer mode (direct or storage, `TRANSFER_MODES`) is
a second strategy: it picks the classes that move the blocks (disagg.direct, disagg.storage).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass

import zmq

from pdserve.config import DisaggConfig
from pdserve.disagg.control import ControlChannel
from pdserve.disagg.decode import DecodeSide
from pdserve.disagg.direct import DirectDecode, DirectPrefill
from pdserve.disagg.prefill import PrefillSide
from pdserve.disagg.storage import PoolReader, StorageDecode, StoragePrefill
from pdserve.kvcache.manager import KVCacheManager
from pdserve.messages import ForwardOutput, KVAbort, KVDest, KVDone, KVRegion, TransferCounters, TransferHandle
from pdserve.request import FinishReason, Request
from pdserve.scheduler.scheduler import RequestError, RequestUpdate, Scheduler, SchedulerOutput


@dataclass(frozen=True)
class RoleContext:
    """What a role may use of its engine."""

    kv: KVCacheManager
    scheduler: Scheduler
    fingerprint: str  # the KV layout's identity (model, dtype, block size, layout, TP)
    tp_size: int
    bytes_per_block: int  # one block, all ranks
    regions: list[list[KVRegion]]  # per rank: how a peer writes into that rank's KV cache
    read_pool: PoolReader  # storage mode, D: read prompts' blocks from the pool on every rank


@dataclass(frozen=True)
class TransferMode:
    """How the blocks move from P to D: the classes of each side."""

    name: str
    prefill: type[PrefillSide]
    decode: type[DecodeSide]


TRANSFER_MODES = {
    "direct": TransferMode("direct", DirectPrefill, DirectDecode),
    "storage": TransferMode("storage", StoragePrefill, StorageDecode),
}

Failures = list[tuple[str, RequestError]]  # (req_id, error) of scheduled requests to fail after the step


class PDRole(ABC):
    name = "mixed"
    control_address = ""  # where peers send KVDest / KVDone / KVAbort ("" without PD)

    @abstractmethod
    def add(self, request: Request, transfer: TransferHandle) -> None:
        """Take one half of a PD pair; raises ValueError (the client's 400) if it cannot."""

    @abstractmethod
    def abort(self, req_id: str) -> bool:
        """Protocol clean-up of an aborted request; True if it lived only here and is finished now."""

    def before_step(self) -> list[RequestUpdate]:
        """Control messages, deadlines and admission, before the scheduler plans the step."""
        return []

    def plan(self, sched: SchedulerOutput) -> None:  # noqa: B027 - optional hook
        """Add this step's sends to `sched.plan`."""

    def after_step(self, sched: SchedulerOutput, output: ForwardOutput) -> Failures:
        """After the step ran, before the scheduler takes its output."""
        return []

    @property
    def has_work(self) -> bool:
        """Held blocks to send: a step must run even with no tokens to compute."""
        return False

    @property
    def num_pending(self) -> int:
        """Transfers waiting on a peer or a deadline: the engine polls often while there are any."""
        return 0

    @property
    def sockets(self) -> list[zmq.Socket]:
        """Sockets the engine's loop should wake on."""
        return []

    def counters(self) -> TransferCounters:
        return TransferCounters()

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release sockets; idempotent."""


class MixedRole(PDRole):
    """No PD: every request runs here end to end."""

    def add(self, request: Request, transfer: TransferHandle) -> None:
        raise ValueError(
            "this instance runs --role mixed and takes no kv_transfer_params; start it with "
            "--role prefill or --role decode to serve PD requests"
        )

    def abort(self, req_id: str) -> bool:
        return False


class _PeerRole(PDRole):
    def __init__(self, ctx: RoleContext, config: DisaggConfig) -> None:
        self.ctx = ctx
        self.control = ControlChannel(config.control_host, config.control_port, secret=config.cluster_secret)
        self.control_address = self.control.address

    @property
    def sockets(self) -> list[zmq.Socket]:
        return [self.control.socket]

    def close(self) -> None:
        self.control.close()


class PrefillRole(_PeerRole):
    """Compute the prompt, sample the first token, send the KV (the mode says how); D does the rest."""

    name = "prefill"

    def __init__(self, ctx: RoleContext, config: DisaggConfig, mode: TransferMode) -> None:
        super().__init__(ctx, config)
        self.prefill = mode.prefill.create(ctx, self.control, config)

    def add(self, request: Request, transfer: TransferHandle) -> None:
        request.sampling = dataclasses.replace(request.sampling, max_tokens=1, stop=[])
        scheduler = self.ctx.scheduler
        scheduler.check_unused(request.req_id)
        self.prefill.add(request, transfer)
        scheduler.park(request)  # until KVDest comes, or it waited long enough for it

    def abort(self, req_id: str) -> bool:
        parked = self.ctx.scheduler.parked.get(req_id)
        if self.prefill.abort(req_id) or parked is not None:
            if parked is not None:
                self.ctx.scheduler.finish_parked(parked, FinishReason.ABORT)
            return True
        return False

    def before_step(self) -> list[RequestUpdate]:
        failed: Failures = []
        for message in self.control.recv_all():
            if isinstance(message, (KVDest, KVAbort)):
                failed += self.prefill.on_control(message)
        failed += self.prefill.expire()
        updates = [u for req_id, error in failed if (u := self.ctx.scheduler.fail(req_id, error)) is not None]
        for request in self.prefill.take_ready():
            self.ctx.scheduler.enqueue(request.req_id)
        return updates

    def plan(self, sched: SchedulerOutput) -> None:
        self.prefill.plan(sched)

    def after_step(self, sched: SchedulerOutput, output: ForwardOutput) -> Failures:
        return self.prefill.on_output(sched.plan, output)

    @property
    def has_work(self) -> bool:
        return self.prefill.has_sends

    @property
    def num_pending(self) -> int:
        return self.prefill.num_pending

    def counters(self) -> TransferCounters:
        return self.prefill.stats.snapshot()


class DecodeRole(_PeerRole):
    """Admit with a reserve, tell P where the KV goes, decode once it is here."""

    name = "decode"

    def __init__(self, ctx: RoleContext, config: DisaggConfig, mode: TransferMode) -> None:
        super().__init__(ctx, config)
        self.decode = mode.decode.create(ctx, self.control, config)

    def add(self, request: Request, transfer: TransferHandle) -> None:
        self.decode.add(request, transfer)

    def abort(self, req_id: str) -> bool:
        return self.decode.abort(req_id)

    def before_step(self) -> list[RequestUpdate]:
        updates: list[RequestUpdate] = []
        for message in self.control.recv_all():
            if isinstance(message, (KVDone, KVAbort)):
                updates += self.decode.on_control(message)
        updates += self.decode.expire()
        updates += self.decode.admit()
        return updates

    def after_step(self, sched: SchedulerOutput, output: ForwardOutput) -> Failures:
        self.decode.on_step()  # the reserve ratio decays per executed step
        return []

    @property
    def num_pending(self) -> int:
        return self.decode.num_pending

    def counters(self) -> TransferCounters:
        return self.decode.stats.snapshot()


def make_role(ctx: RoleContext, config: DisaggConfig) -> PDRole:
    """The role `config.role` asks for, with its transfer mode."""
    if config.role == "mixed":
        return MixedRole()
    mode = TRANSFER_MODES[config.kv_transfer]
    return PrefillRole(ctx, config, mode) if config.role == "prefill" else DecodeRole(ctx, config, mode)
