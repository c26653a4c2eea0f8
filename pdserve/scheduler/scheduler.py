"""Continuous batching with chunked prefill, prefix reuse and preemption.

Each step gives every running request some tokens (1 when caught up, a chunk
otherwise) within max_num_batched_tokens and max_num_seqs, then admits
waiting requests FIFO, each starting from its longest cached prefix (device,
host, pool). When blocks run out, the most recently admitted running request
is preempted: its computed blocks are saved (with a host tier or pool) and it
goes back to the front of the queue; on readmission it matches what was saved
and recomputes only the rest.

It is the one owner of a request's lifecycle: only the scheduler writes
`Request.status` and `finish_reason`. A PD request not yet schedulable (P: it
waits for D's KVDest; D: it waits for admission and P's KV) is parked here
(`parked`, not in `requests`); the PD sides keep only their protocol state
(rooms, deadlines, peers) and ask for the transitions: park, enqueue (P),
add_computed (D), finish_parked, fail.

Status:   WAITING --schedule--> RUNNING --stop/length/abort--> FINISHED
          RUNNING --preempt--> WAITING (num_preemptions > 0: `Request.is_preempted`)
          parked (WAITING) --enqueue--> WAITING, --add_computed--> RUNNING, --finish_parked--> FINISHED

`state_of(request)` names the lifecycle state explicitly (`RequestState`): waiting,
waiting for remote KV (parked), running, preempted, finished.

The scheduler knows nothing about tensors, models or PD roles.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from pdserve.config import SchedulerConfig
from pdserve.kvcache.manager import KVCacheManager, PoolLoad
from pdserve.messages import CacheOps, ForwardOutput, PoolRead, PromptLogprob, ScheduledSeq, StepPlan
from pdserve.request import FinishReason, Request, RequestState, RequestStatus
from pdserve.scheduler.pool_reads import PoolReads

logger = logging.getLogger(__name__)


@dataclass
class SchedulerOutput:
    plan: StepPlan
    num_new_tokens: dict[str, int]


@dataclass(frozen=True)
class RequestError:
    """Why a request failed, as the HTTP client should see it."""

    status: int  # 502, 503, ...
    code: str  # "kv_transfer_timeout", "no_capacity", ...
    message: str


@dataclass
class RequestUpdate:
    """What one step did to one request: tokens appended, maybe finished (with an error if it failed)."""

    request: Request
    new_token_ids: list[int]
    # per new token: [(token_id, logprob)], the sampled token first, then the top k
    new_logprobs: list[list[tuple[int, float]]] | None = None
    finished: bool = False
    error: RequestError | None = None
    prompt_logprobs: list[PromptLogprob] | None = None  # scored prompt tokens not sent before


@dataclass
class SchedulerStats:
    num_preemptions: int = 0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_recomputed_tokens: int = 0  # tokens computed again after a preemption
    num_steps: int = 0
    finished_req_ids: list[str] = field(default_factory=list)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}  # waiting or running
        self.parked: dict[str, Request] = {}  # PD requests known here, not schedulable yet (see the docstring)
        self.stats = SchedulerStats()
        # called with each preempted request, as it is preempted (D's reserve resets on a preemption)
        self.preemption_listeners: list[Callable[[Request], None]] = []
        self._step_id = 0
        self._finished_since_last_plan: list[str] = []
        self._pool_probed: set[str] = set()  # waiting requests whose pool blocks were already looked up
        self.pool_reads = PoolReads(kv)  # lookups and reads the step plans carry (scheduler.pool_reads)
        # Keep a sliver of blocks free at admission so running requests can grow.
        self._admission_reserve = max(1, kv.num_blocks // 100) if kv.num_blocks > 8 else 0

    # ---- requests in and out -------------------------------------------------

    def add_request(self, request: Request) -> None:
        self.check_unused(request.req_id)
        self.requests[request.req_id] = request
        self.waiting.append(request)

    def state_of(self, request: Request) -> RequestState:
        """The lifecycle state of `request`, named explicitly (`RequestState`)."""
        if request.status is RequestStatus.FINISHED:
            return RequestState.FINISHED
        if self.parked.get(request.req_id) is request:
            return RequestState.WAITING_FOR_REMOTE_KV
        if request.status is RequestStatus.RUNNING:
            return RequestState.RUNNING
        return RequestState.PREEMPTED if request.is_preempted else RequestState.WAITING

    def check_unused(self, req_id: str) -> None:
        """Raise ValueError if `req_id` names a request known here."""
        if req_id in self.requests or req_id in self.parked:
            raise ValueError(f"request id {req_id!r} is already in use")

    def park(self, request: Request) -> None:
        """Know a PD request that must not be scheduled yet (it stays WAITING, outside `requests`)."""
        self.check_unused(request.req_id)
        self.parked[request.req_id] = request

    def enqueue(self, req_id: str) -> Request:
        """P: a parked request may be scheduled now (its KVDest came, or it waited long enough for it)."""
        request = self.parked.pop(req_id)
        self.requests[req_id] = request
        self.waiting.append(request)
        return request

    def finish_parked(self, request: Request, reason: FinishReason) -> None:
        """End a PD request that never ran here (parked, or only known to its PD side): free its blocks."""
        self.parked.pop(request.req_id, None)
        self.kv.free(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason

    def fail(self, req_id: str, error: RequestError) -> RequestUpdate | None:
        """Finish a waiting, running or parked request with an error the client will see (None: unknown)."""
        request = self.requests.get(req_id)
        if request is not None:
            self._finish(request, FinishReason.ABORT)
        elif req_id in self.parked:
            request = self.parked[req_id]
            self.finish_parked(request, FinishReason.ABORT)
        else:
            return None
        logger.warning("request %s failed: %s", req_id, error.message)
        return RequestUpdate(request, [], finished=True, error=error)

    def abort(self, req_id: str) -> Request | None:
        """Finish `req_id` with reason 'abort' and free its blocks. Unknown ids are ignored."""
        return self.finish(req_id, FinishReason.ABORT)

    def finish(self, req_id: str, reason: FinishReason) -> Request | None:
        """Finish from outside (abort, a stop string matched by the detokenizer); returns the request."""
        request = self.requests.get(req_id)
        if request is None or request.is_finished:
            return None
        self._finish(request, reason)
        return request

    def _finish(self, request: Request, reason: FinishReason) -> None:
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        self.kv.free(request)
        self._pool_probed.discard(request.req_id)
        self.pool_reads.forget(request.req_id)
        del self.requests[request.req_id]
        self._finished_since_last_plan.append(request.req_id)

    def add_computed(
        self, request: Request, token_id: int | None, logprobs: list[tuple[int, float]] | None = None
    ) -> RequestUpdate:
        """Start running a request whose prompt was computed elsewhere (its KV is in its blocks already,
        num_computed_tokens set), appending the token sampled there. It may finish at once (a stop token).
        token_id None: only the first num_computed_tokens are there; the rest of the prompt is computed
        here like any running request's, and the first token sampled here."""
        self.parked.pop(request.req_id, None)
        self.check_unused(request.req_id)
        self.requests[request.req_id] = request
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        if token_id is None:
            return RequestUpdate(request, [])
        request.output_token_ids.append(token_id)
        self.stats.num_generation_tokens += 1
        reason = self._stop_reason(request, token_id)
        if reason is not None:
            self._finish(request, reason)
        return RequestUpdate(request, [token_id], [list(logprobs)] if logprobs else None, finished=reason is not None)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def has_work(self) -> bool:
        """Requests to run, or cache ops (e.g. pool writes of finished requests) still to send."""
        return bool(self.requests) or self.kv.has_pending_ops

    # ---- pool reads by the caller, before a step (the engine core has the plan carry them instead) ----

    def pool_lookups(self) -> list[tuple[Request, list[bytes]]]:
        """The requests next in line with the keys to look up in the pool, each request once per wait."""
        lookups = []
        room = self.config.max_num_seqs - len(self.running)
        for request in itertools.islice(self.waiting, max(0, room)):  # the queue may be long
            if request.req_id in self._pool_probed:
                continue
            self._pool_probed.add(request.req_id)
            keys = self.kv.pool_lookup_keys(request)
            if keys:
                lookups.append((request, keys))
        return lookups

    def plan_pool_loads(
        self, lookups: list[tuple[Request, list[bytes]]] | None = None, num_in_pool: list[int] | None = None
    ) -> list[PoolLoad]:
        """Pool reads for `lookups` (default: pool_lookups()), each limited to the blocks the pool holds."""
        if lookups is None:
            lookups = self.pool_lookups()
        counts: list[int | None] = list(num_in_pool) if num_in_pool is not None else [None] * len(lookups)
        loads = []
        for (request, _), count in zip(lookups, counts):
            load = self.kv.plan_pool_load(request, count)
            if load is not None:
                loads.append(load)
        return loads

    def finish_pool_loads(self, loads: list[PoolLoad], num_loaded: list[int]) -> None:
        for load, n in zip(loads, num_loaded):
            self.kv.finish_pool_load(load, n)

    # ---- one step ------------------------------------------------------------

    def schedule(self, *, pool_reads: bool = False) -> SchedulerOutput:
        """Plan one step. pool_reads: the plan also carries the pool lookups and reads of the requests next in
        line (scheduler.pool_reads), so the step is one round trip to the workers; without it, a caller that
        reads the pool itself does so before (pool_lookups, plan_pool_loads, finish_pool_loads)."""
        reads = self.pool_reads.plan(self.pool_lookups(), self.requests) if pool_reads else []
        budget = self.config.max_num_batched_tokens
        num_new: dict[str, int] = {}
        num_preemptions_before = self.stats.num_preemptions
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._allocate_or_preempt(request, request.num_computed_tokens + n):
                break  # `request` itself was preempted, so it was the last one running
            num_new[request.req_id] = n
            budget -= n
            index += 1
        if self.stats.num_preemptions == num_preemptions_before:
            self._admit(budget, num_new)
        return self._build_plan(num_new, reads)

    def fork(self, leader: Request, request: Request) -> bool:
        """Run `request`, another choice of `leader`'s prompt (n > 1), on the leader's computed prompt blocks
        (kvcache.manager.fork): it computes only the last prompt token. False: it was not forked (the leader's
        prompt is not in its blocks, no slot or no block); queue it instead."""
        if leader not in self.running or len(self.running) >= self.config.max_num_seqs:
            return False
        self.check_unused(request.req_id)
        reserve = self._admission_reserve if self.running else 0
        num_computed = self.kv.fork(leader, request, reserve)
        if not num_computed:
            return False
        self.requests[request.req_id] = request
        request.num_computed_tokens = num_computed
        request.num_cached_tokens = num_computed
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        return True

    def _allocate_or_preempt(self, request: Request, num_tokens: int) -> bool:
        """Allocate for `request`, preempting the most recently admitted until it fits.

        Returns False if `request` itself had to be preempted.
        """
        while not self.kv.allocate_slots(request, num_tokens):
            victim = self.running.pop()
            self._preempt(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.kv.free(request, preempted=True)
        self._pool_probed.discard(request.req_id)
        request.num_computed_high = max(request.num_computed_high, request.num_computed_tokens)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.waiting.appendleft(request)
        self.stats.num_preemptions += 1
        logger.info("request %s preempted after %d computed tokens", request.req_id, request.num_computed_high)
        for listener in self.preemption_listeners:
            listener(request)

    def _admit(self, budget: int, num_new: dict[str, int]) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if self.pool_reads.is_pending(request.req_id):
                break  # FIFO: its pool hits arrive with a later step
            match = self.kv.match(request)
            num_cached = match.num_blocks * self.kv.block_size
            n = min(request.num_tokens - num_cached, budget)
            reserve = self._admission_reserve if self.running else 0
            if not self.kv.allocate_slots(request, num_cached + n, reserve=reserve, match=match):
                break
            self.waiting.popleft()
            self._pool_probed.discard(request.req_id)
            request.num_computed_tokens = num_cached
            if request.num_preemptions == 0:
                request.num_cached_tokens = min(num_cached, request.num_prompt_tokens)
            if num_cached:
                logger.debug("request %s reuses %d cached tokens", request.req_id, num_cached)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            num_new[request.req_id] = n
            budget -= n

    def _build_plan(self, num_new: dict[str, int], pool_reads: list[PoolRead] | None = None) -> SchedulerOutput:
        seqs = []
        for request in self.running:
            n = num_new.get(request.req_id)
            if n is None:
                continue
            start = request.num_computed_tokens
            end = start + n
            # the chunk's logits score prompt tokens start + 1 ... end: any not scored yet?
            scores_prompt = (
                request.sampling.prompt_logprobs is not None
                and min(end, request.num_prompt_tokens - 1) >= request.num_prompt_scored
            )
            seqs.append(
                ScheduledSeq(
                    req_id=request.req_id,
                    token_ids=request.token_ids_slice(start, end),
                    start_pos=start,
                    block_ids=list(self.kv.block_ids(request.req_id)),
                    sample=end == request.num_tokens,
                    sampling=request.sampling.to_spec(request),
                    prompt_logprobs=request.sampling.prompt_logprobs if scores_prompt else -1,  # type: ignore[arg-type]
                    prompt_next_token=request.prompt_token_ids[end] if end < request.num_prompt_tokens else -1,
                )
            )
        self._step_id += 1
        # else its finished ids ride on the next plan
        is_executed = bool(seqs) or self.kv.has_pending_ops or bool(pool_reads)
        plan = StepPlan(
            step_id=self._step_id,
            seqs=seqs,
            finished_req_ids=self._finished_since_last_plan,
            cache_ops=self.kv.take_ops() if is_executed else CacheOps(),
            pool_reads=pool_reads or [],
        )
        if is_executed:
            self._finished_since_last_plan = []
        return SchedulerOutput(plan=plan, num_new_tokens=num_new)

    def update(self, sched: SchedulerOutput, output: ForwardOutput) -> list[RequestUpdate]:
        """Advance computed tokens, append sampled tokens, finish what is done."""
        self.stats.num_steps += 1
        self.kv.end_step()
        if sched.plan.pool_reads:
            self.pool_reads.finish(sched.plan.pool_reads, output.pool_read, self.requests)
        sampled = dict(zip(output.req_ids, range(len(output.req_ids))))
        for req_id, (first, scores) in output.prompt_logprobs.items():
            request = self.requests.get(req_id)
            if request is not None:  # positions scored before a preemption are not sent again
                skip = request.num_prompt_scored - first
                request.unsent_prompt_logprobs += scores[max(skip, 0) :]
                request.num_prompt_scored = max(request.num_prompt_scored, first + len(scores))
        updates = []
        for req_id, n in sched.num_new_tokens.items():
            request = self.requests.get(req_id)
            if request is None:  # aborted while the step ran
                continue
            start = request.num_computed_tokens
            if start < request.num_prompt_tokens:
                self.stats.num_prompt_tokens += min(n, request.num_prompt_tokens - start)
            if start < request.num_computed_high:
                self.stats.num_recomputed_tokens += min(n, request.num_computed_high - start)
            request.num_computed_tokens += n
            self.kv.cache_computed(request)
            index = sampled.get(req_id)
            if index is None:
                continue
            token_id = output.token_ids[index]
            request.output_token_ids.append(token_id)
            self.stats.num_generation_tokens += 1
            logprobs = None
            if output.logprobs is not None and request.sampling.logprobs is not None:  # (a batch has all rows)
                logprobs = [list(output.logprobs[index])]
            reason = self._stop_reason(request, token_id)
            if reason is not None:
                self._finish(request, reason)
            scored = request.unsent_prompt_logprobs or None
            request.unsent_prompt_logprobs = []
            updates.append(
                RequestUpdate(request, [token_id], logprobs, finished=reason is not None, prompt_logprobs=scored)
            )
        return updates

    def _stop_reason(self, request: Request, token_id: int) -> FinishReason | None:
        sp = request.sampling
        if sp.stop_token_ids and token_id in sp.stop_token_ids:
            return FinishReason.STOP
        if not sp.ignore_eos and token_id == request.eos_token_id:
            return FinishReason.STOP
        if len(request.output_token_ids) >= sp.max_tokens or request.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def check_integrity(self) -> None:
        self.kv.check_integrity()
        for req_id, request in self.parked.items():
            if req_id in self.requests or request.status is not RequestStatus.WAITING:
                raise AssertionError(f"parked request {req_id} is {request.status.name} or also scheduled")
        for request in self.running:
            held = len(self.kv.block_ids(request.req_id))
            if held * self.kv.block_size < request.num_computed_tokens:
                raise AssertionError(f"{request.req_id} computed more tokens than its blocks hold")
