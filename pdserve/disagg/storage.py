"""The storage transfer mode: the prompt's blocks go through the KV pool (Mooncake Store, file, memory).

P: no KVDest is awaited before the prefill. The step that computes a prompt's last chunk also writes all its
blocks to the pool (PoolSend: staged into host blocks after the forward, put by every rank, one object per
rank `<key>@<rank>`: full blocks under their chained prefix-cache keys, the last incomplete block under
`<chained key>:partial:N`). Once every rank confirmed and KVDest has come, KVDone goes to D. A failed write
does not fail the request here: KVDone tells D (code kv_store_write_failed), whose
--kv-load-failure-policy decides.

D: on KVDone, D reads the prompt's blocks from the pool (every rank its own objects) into host blocks, and
swap-ins copy them into the request's blocks before its first decode step. Blocks missing or unreadable
(or never written: P's KVDone says so): with --kv-load-failure-policy fail, 502 kv_load_failed saying how
many; with recompute, D keeps the leading blocks it read and prefills the rest itself. P never writes into
D's blocks, so nothing is quarantined.

Pure Python: the workers stage, put and get (worker.kv_tiers); the host blocks are planned by
kvcache.manager.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from pdserve.config import DisaggConfig
from pdserve.disagg.control import ControlChannel
from pdserve.disagg.decode import DecodeSide, Incoming
from pdserve.disagg.prefill import WRITE_FAILED, Outgoing, Phase, PrefillSide
from pdserve.kvcache.keys import partial_key
from pdserve.kvcache.manager import KVCacheManager, PoolLoad, num_blocks_for
from pdserve.messages import KVDone, KVRegion, KVSendReport, PoolSend, StepPlan
from pdserve.request import Request
from pdserve.scheduler.scheduler import RequestError, RequestUpdate, Scheduler, SchedulerOutput

if TYPE_CHECKING:
    from pdserve.disagg.role import RoleContext

logger = logging.getLogger(__name__)

# read a batch of prompts' blocks from the pool on every rank; per load, how many leading blocks every
# rank read (the engine's executor.load_from_pool)
PoolReader = Callable[[list[PoolLoad]], list[int]]


# ---- a prompt's blocks through the pool: names and host staging (kvcache.tiers keeps the host blocks) ----


def prompt_object_keys(kv: KVCacheManager, request: Request) -> list[str]:
    """The pool names of the request's prompt blocks: chained keys of the full blocks, then
    `<key>:partial:N` for an incomplete last block (kvcache.keys)."""
    bs = kv.block_size
    prompt = request.prompt_token_ids
    full = kv.keys_for(request)[: len(prompt) // bs]
    partial = partial_key(kv.root, full, prompt, bs)
    return [k.hex() for k in full] + ([partial] if partial is not None else [])


def _full_prompt_keys(kv: KVCacheManager, request: Request) -> list[bytes]:
    return kv.keys_for(request)[: request.num_prompt_tokens // kv.block_size]


def stage_prompt(kv: KVCacheManager, request: Request) -> list[int] | None:
    """P: host blocks to stage the request's prompt blocks in for a pool write carried by the plan just
    built (held until its end_step); None if the host tier has no room for them now. Full blocks are
    named, so they stay cached on the host after the write."""
    num = num_blocks_for(request.num_prompt_tokens, kv.block_size)
    return kv.tiers.allocate_for_write(_full_prompt_keys(kv, request), num)


def note_in_pool(kv: KVCacheManager, keys: Sequence[bytes]) -> None:
    """Every rank wrote these blocks to the pool: a finished request need not write them again."""
    for key in keys:
        kv.tiers.remember_in_pool(key)


def plan_prompt_load(kv: KVCacheManager, request: Request) -> PoolLoad | None:
    """D: host blocks to read the request's prompt blocks into (prompt_object_keys); None if the host
    tier has no room for them now. Pass the load to finish_prompt_load once read."""
    host_ids = kv.tiers.allocate_for_read(request.req_id, num_blocks_for(request.num_prompt_tokens, kv.block_size))
    return None if host_ids is None else PoolLoad(request.req_id, prompt_object_keys(kv, request), host_ids)


def finish_prompt_load(kv: KVCacheManager, request: Request, load: PoolLoad, num_used: int) -> None:
    """Copy the first `num_used` blocks read into the request's device blocks (swap-ins before the next
    forward) and free the other host blocks. Full blocks stay cached on the host."""
    kv.tiers.finish_read(load, num_used, _full_prompt_keys(kv, request), kv.block_ids(request.req_id))


class StoragePrefill(PrefillSide):
    def _release_delay(self) -> float:
        return 0.0  # no block goes to D's ids: nothing to wait for

    def _on_dest(self, out: Outgoing) -> None:
        self._complete_written(out)

    def plan(self, sched: SchedulerOutput) -> None:
        sched.plan.pool_sends = self.plan_pool_sends(sched)

    def plan_pool_sends(self, sched: SchedulerOutput) -> list[PoolSend]:
        """Pool writes of the prompts whose last chunk this step computes, and of HELD prompts the host tier
        had no room for before."""
        sends: list[PoolSend] = []
        for seq, out in self._in_plan(sched.plan):
            if out.phase is Phase.PREFILLING and seq.start_pos + len(seq.token_ids) >= out.request.num_prompt_tokens:
                self._stage(sends, out, seq.block_ids)
        scheduled = {seq.req_id for seq in sched.plan.seqs}
        for out in self._by_room.values():
            if out.phase is Phase.HELD and out.request.req_id not in scheduled:
                assert out.held is not None
                self._stage(sends, out, out.held)
        return sends

    def _stage(self, sends: list[PoolSend], out: Outgoing, block_ids: list[int]) -> None:
        num_blocks = self._num_prompt_blocks(out)
        if num_blocks > self.kv.num_host_blocks:  # it would never fit: fail the write now, D's policy decides
            out.write_error = (
                f"the prompt's {num_blocks} blocks do not fit in the prefill instance's host tier "
                f"({self.kv.num_host_blocks} blocks), which stages pool writes; raise "
                "--host-kv-cache-memory"
            )
            out.move(Phase.WRITTEN)
            self.stats.fail("write_error")
            logger.warning("request %s: %s", out.request.req_id, out.write_error)
            return
        host_ids = stage_prompt(self.kv, out.request)
        if host_ids is None:  # the host tier is busy this step: the blocks are held and staged in a later one
            return
        sends.append(
            PoolSend(
                room=out.room,
                device_block_ids=block_ids[: len(host_ids)],
                host_block_ids=host_ids,
                keys=prompt_object_keys(self.kv, out.request),
            )
        )
        out.move(Phase.WRITING)
        out.started = self.clock()

    def _record(self, report: KVSendReport) -> None:
        if report.rank == 0:
            self.stats.pool_seconds_put += report.seconds_busy

    def _after_output(self, plan: StepPlan) -> list[tuple[str, RequestError]]:
        """The rooms whose write ran are WRITTEN (ok or failed); prompts not staged yet are HELD; KVDone goes
        where KVDest is here."""
        written = {send.room for send in plan.pool_sends}
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
                    note_in_pool(self.kv, _full_prompt_keys(self.kv, out.request))
                out.move(Phase.WRITTEN)
                self._unhold(out)
            elif out.first_token is not None and out.phase is Phase.PREFILLING:
                self._hold(out)
                # the pool send to come writes these blocks: the request's finish must not write them through
                note_in_pool(self.kv, _full_prompt_keys(self.kv, out.request))
            self._complete_written(out)
        return []

    def _complete_written(self, out: Outgoing) -> None:
        """Tell D once the write is over (either way), the first token is known and KVDest came."""
        if out.dest is None or out.first_token is None or out.phase is not Phase.WRITTEN:
            return
        if out.write_error is not None:
            num_blocks = self._num_prompt_blocks(out)
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
        self._complete(out, "in the pool, KVDone sent to ")

    @property
    def has_sends(self) -> bool:
        return any(out.phase is Phase.HELD for out in self._by_room.values())


class StorageDecode(DecodeSide):
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
        read_pool: PoolReader | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(
            kv,
            scheduler,
            control,
            regions,
            fingerprint,
            tp_size,
            bytes_per_block,
            config,
            **kwargs,  # type: ignore[arg-type]
        )
        if read_pool is None:
            raise ValueError("storage mode needs a pool reader")
        self.read_pool = read_pool
        self._to_read: list[Incoming] = []  # KVDone came, no host blocks to read into yet

    @classmethod
    def create(cls, ctx: RoleContext, control: ControlChannel, config: DisaggConfig) -> DecodeSide:
        return cls(
            ctx.kv,
            ctx.scheduler,
            control,
            ctx.regions,
            ctx.fingerprint,
            ctx.tp_size,
            ctx.bytes_per_block,
            config,
            read_pool=ctx.read_pool,
        )

    def _on_done(self, incoming: Incoming, message: KVDone) -> list[RequestUpdate]:
        if message.status == "ok" or message.code == WRITE_FAILED:
            incoming.done = message
            self._to_read.append(incoming)
            return self.read_from_pool()
        error = RequestError(
            502, message.code or "kv_transfer_failed", f"the prefill instance failed the KV transfer: {message.error}"
        )
        return [self._fail(incoming, error, False)]

    def _before_admit(self) -> list[RequestUpdate]:
        return self.read_from_pool() if self._to_read else []

    def _forget(self, incoming: Incoming) -> None:
        if incoming in self._to_read:
            self._to_read.remove(incoming)

    def read_from_pool(self) -> list[RequestUpdate]:
        """Read the blocks of every request whose KVDone came, as far as the host tier has room (the rest
        wait for the next step, within their receive deadline); start or fail each."""
        pending, self._to_read = self._to_read, []
        loads: list[tuple[Incoming, PoolLoad]] = []
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
            load = plan_prompt_load(self.kv, incoming.request)
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

    def _on_read(self, incoming: Incoming, load: PoolLoad | None, num_read: int) -> RequestUpdate:
        message = incoming.done
        assert message is not None
        request = incoming.request
        num_blocks = math.ceil(request.num_prompt_tokens / self.kv.block_size)
        self.stats.bytes_received += num_read * self.bytes_per_block
        policy = self.config.kv_load_failure_policy
        if num_read == num_blocks or policy == "recompute":
            if load is not None:
                finish_prompt_load(self.kv, request, load, num_read)
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
            finish_prompt_load(self.kv, request, load, 0)
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

    def _why_missing(self, incoming: Incoming) -> str:
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
