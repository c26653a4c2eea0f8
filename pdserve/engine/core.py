"""The engine core: the one authority of an instance.

It validates requests, schedules every step, broadcasts the step plan to all
ranks through the executor and applies the result. It knows token ids, never
text, and never which PD role it plays: that is one `PDRole` strategy
(disagg.role; `MixedRole` without PD), and a request's lifecycle is the
scheduler's.
"""

from __future__ import annotations

import logging
import time

from pdserve.config import DEFAULT_CPU_KV_CACHE_MEMORY, EngineConfig
from pdserve.disagg.role import PDRole, RoleContext, make_role
from pdserve.engine.grammar import Grammars
from pdserve.engine.tokenizer import load_tokenizer
from pdserve.kvcache import KVCacheManager
from pdserve.kvcache.keys import ModelFingerprint
from pdserve.messages import EngineStats, StoreCounters, TransferHandle
from pdserve.models.arch import ModelArch
from pdserve.models.loader import ModelSource, load_arch, resolve_model, weights_id
from pdserve.request import FinishReason, Request, SamplingParams
from pdserve.scheduler.scheduler import RequestError, RequestUpdate, Scheduler
from pdserve.validation import validate_prompt_token_ids
from pdserve.worker.executor import Executor, MultiProcExecutor, UniProcExecutor

logger = logging.getLogger(__name__)

DTYPE_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2}


def resolve_max_model_len(config: EngineConfig, arch: ModelArch) -> int:
    limit = arch.max_position_embeddings
    if arch.sliding_window:
        limit = min(limit, arch.sliding_window)  # attention here is full, so stay within the window
    wanted = config.model.max_model_len
    if wanted is None:
        return limit
    if wanted > limit:
        raise ValueError(f"max_model_len {wanted} is more than this model supports ({limit}); lower --max-model-len")
    return wanted


def bytes_per_block(config: EngineConfig, arch: ModelArch) -> int:
    """Bytes of one KV block (all layers, K and V) on one rank."""
    tp = config.parallel.tensor_parallel_size
    return arch.kv_bytes_per_token(DTYPE_SIZES[config.model.dtype], tp) * config.cache.block_size


def fingerprint(config: EngineConfig, source: ModelSource, arch: ModelArch) -> ModelFingerprint:
    tp = config.parallel.tensor_parallel_size
    return ModelFingerprint(
        weights_id=weights_id(source, config.model.seed),
        dtype=config.model.dtype,
        block_size=config.cache.block_size,
        layout=f"block-major:L{arch.num_layers}x2xT{config.cache.block_size}xH{arch.num_kv_heads // tp}"
        f"xD{arch.head_dim}",
        tp_size=tp,
    )


def resolve_num_blocks(config: EngineConfig, arch: ModelArch, max_model_len: int) -> int:
    cache = config.cache
    if cache.num_blocks is not None:
        num_blocks = cache.num_blocks
    else:
        memory = cache.kv_cache_memory or DEFAULT_CPU_KV_CACHE_MEMORY
        num_blocks = memory // bytes_per_block(config, arch)
    capacity = num_blocks * cache.block_size
    if capacity < max_model_len:
        raise ValueError(
            f"the KV cache holds {capacity} tokens ({num_blocks} blocks of {cache.block_size}), fewer than "
            f"max_model_len {max_model_len}; raise --num-blocks / --kv-cache-memory or lower --max-model-len"
        )
    return num_blocks


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.source: ModelSource = resolve_model(config.model)
        self.arch: ModelArch = load_arch(self.source)
        self.arch.check_tensor_parallel(config.parallel.tensor_parallel_size)
        self.max_model_len = resolve_max_model_len(config, self.arch)
        self.num_blocks = resolve_num_blocks(config, self.arch, self.max_model_len)
        self.num_host_blocks = config.cache.host_blocks(bytes_per_block(config, self.arch))
        started = time.monotonic()
        self.executor: Executor
        if config.parallel.tensor_parallel_size == 1:
            self.executor = UniProcExecutor(
                config, self.source, self.arch, self.num_blocks, self.num_host_blocks, self.max_model_len
            )
        else:
            self.executor = MultiProcExecutor(config, self.num_blocks, self.num_host_blocks, self.max_model_len)
        cache = config.cache
        logger.info(
            "model %s loaded in %.1fs; KV cache %d device blocks of %d tokens, %d host blocks, pool %s, "
            "prefix caching %s; max_model_len %d",
            self.source.name,
            time.monotonic() - started,
            self.num_blocks,
            cache.block_size,
            self.num_host_blocks,
            cache.kv_store or "none",
            "on" if cache.enable_prefix_caching else "off",
            self.max_model_len,
        )
        self.kv = KVCacheManager(
            self.num_blocks,
            cache.block_size,
            root=fingerprint(config, self.source, self.arch).root(),
            num_host_blocks=self.num_host_blocks,
            has_pool=cache.kv_store is not None,
            enable_prefix_caching=cache.enable_prefix_caching,
            preempt_save=cache.preempt_save,
            cache_output=cache.cache_output or config.disagg.writes_output_to_pool,
        )
        self.store_counters = StoreCounters()
        self.scheduler = Scheduler(config.scheduler, self.kv, self.max_model_len)
        self.eos_token_id = self.arch.eos_token_ids[0] if self.arch.eos_token_ids else None
        self.fingerprint = fingerprint(config, self.source, self.arch).root().hex()
        tp = config.parallel.tensor_parallel_size
        ctx = RoleContext(
            self.kv,
            self.scheduler,
            self.fingerprint,
            tp,
            bytes_per_block(config, self.arch) * tp,
            self.executor.regions,
            read_pool=lambda loads: self.executor.load_from_pool(loads)[0],
        )
        self.pd: PDRole = make_role(ctx, config.disagg)
        self._siblings: list[tuple[Request, Request, TransferHandle | None]] = []  # (leader, waiting, its PD half)
        self._leader_of: dict[str, Request] = {}  # released siblings, until queued
        self.grammars = Grammars(
            lambda: load_tokenizer(self.source),
            config.model.sampled_vocab_size or self.arch.vocab_size,
            list(self.arch.eos_token_ids),
        )

    @property
    def control_address(self) -> str:
        return self.pd.control_address

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        """Raise ValueError naming the problem and the fix (the API server runs the same check)."""
        validate_prompt_token_ids(prompt_token_ids, self.max_model_len, self.arch.vocab_size)

    def add_request(
        self,
        req_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        transfer: TransferHandle | None = None,
        after: str | None = None,
    ) -> Request:
        """Queue a request; with `transfer` it is one half of a PD pair (what half: this instance's role). `after`:
        the request it is a sibling choice of (n > 1): it waits until that one's prompt is computed."""
        self.validate_prompt(prompt_token_ids)
        request = Request(req_id, tuple(prompt_token_ids), sampling, self.eos_token_id, time.time())
        leader = self._find(after) if after is not None else None
        if leader is not None:
            self._siblings.append((leader, request, transfer))
        elif sampling.grammar is not None:
            self.grammars.hold(request, transfer)  # queued once its grammar compiles
        else:
            self._queue(request, transfer)
        logger.info(
            "request %s added: %d prompt tokens, max_tokens %d%s",
            req_id,
            len(prompt_token_ids),
            sampling.max_tokens,
            f", {self.pd.name} of room {transfer.room}" if transfer else "",
        )
        return request

    def _find(self, req_id: str) -> Request | None:
        """An unfinished request of this core, wherever it waits."""
        held = self.grammars.held.get(req_id)
        request = held.request if held else self.scheduler.requests.get(req_id) or self.scheduler.parked.get(req_id)
        return request if request is not None and not request.is_finished else None

    def _release_siblings(self) -> None:
        """Queue the sibling choices whose leader's prompt is computed (or that ended)."""
        waiting = []
        for leader, request, transfer in self._siblings:
            if self._find(leader.req_id) is None or leader.num_computed_tokens >= leader.num_prompt_tokens:
                self._leader_of[request.req_id] = leader
                if request.sampling.grammar is not None:
                    self.grammars.hold(request, transfer)
                else:
                    self._queue(request, transfer)
            else:
                waiting.append((leader, request, transfer))
        self._siblings = waiting

    def _queue(self, request: Request, transfer: TransferHandle | None) -> None:
        leader = self._leader_of.pop(request.req_id, None)
        if transfer is not None:
            self.pd.add(request, transfer)
        elif leader is None or not self.scheduler.fork(leader, request):  # a sibling runs on its leader's blocks
            self.scheduler.add_request(request)

    def abort(self, req_id: str) -> None:
        self.finish(req_id, FinishReason.ABORT)

    def finish(self, req_id: str, reason: FinishReason) -> None:
        """End a request from outside (abort, a stop string matched by the API server); frees its blocks."""
        self._leader_of.pop(req_id, None)
        if any(r.req_id == req_id for _, r, _ in self._siblings):
            self._siblings = [s for s in self._siblings if s[1].req_id != req_id]
            return
        if self.grammars.drop(req_id):
            return
        if self.pd.abort(req_id):
            return
        request = self.scheduler.requests.get(req_id)
        if request is None:
            return
        self.scheduler.finish(req_id, reason)
        logger.info(
            "request %s finished (%s): %d output tokens, %d preemptions",
            req_id,
            reason.value,
            len(request.output_token_ids),
            request.num_preemptions,
        )

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    @property
    def has_work(self) -> bool:
        """Requests to run, cache writes still to send to the workers, or KV to send to a decode instance."""
        return self.scheduler.has_work or self.pd.has_work

    @property
    def is_waiting_on_peers(self) -> bool:
        """PD requests wait for a peer (KVDest, KVDone) or a deadline, or requests for their grammar to compile:
        poll often, no step needed."""
        return self.pd.num_pending > 0 or bool(self.grammars.held) or bool(self._siblings)

    def step(self) -> list[RequestUpdate]:
        self._release_siblings()
        updates = self._take_compiled()
        updates += self.pd.before_step()
        updates += self._step()
        for update in updates:
            if update.finished:
                self.grammars.drop(update.request.req_id)
                r = update.request
                logger.info(
                    "request %s finished (%s): %d output tokens, %d preemptions",
                    r.req_id,
                    r.finish_reason.value if r.finish_reason else None,
                    len(r.output_token_ids),
                    r.num_preemptions,
                )
        return updates

    def _take_compiled(self) -> list[RequestUpdate]:
        """Queue the requests whose grammar compiled; fail (400) those whose grammar did not."""
        ready, failed = self.grammars.take_ready()
        for held in ready:
            self._queue(held.request, held.transfer)
        return [
            RequestUpdate(held.request, [], finished=True, error=RequestError(400, "invalid_grammar", why))
            for held, why in failed
        ]

    def _step(self) -> list[RequestUpdate]:
        """One round trip to the workers: the plan carries the forward, the cache copies, the PD sends and the
        pool reads of requests next in line."""
        sched = self.scheduler.schedule(pool_reads=True)
        self.pd.plan(sched)
        rejected = self.grammars.fill(sched.plan, self.scheduler.requests)
        if sched.plan.is_empty:
            return []
        output = self.executor.execute(sched.plan)
        self.store_counters = output.store
        failed = self.pd.after_step(sched, output)
        updates = self.scheduler.update(sched, output)
        failed += [(req_id, RequestError(500, "grammar_rejected_token", why)) for req_id, why in rejected]
        for req_id, error in failed:
            update = self.scheduler.fail(req_id, error) if req_id in self.scheduler.requests else None
            if update is not None:
                updates.append(update)
        return updates

    def stats(self) -> EngineStats:
        s = self.scheduler.stats
        c = self.kv.stats
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting)
            + len(self.scheduler.parked)
            + len(self.grammars.held)
            + len(self._siblings),
            num_blocks_total=self.kv.num_blocks,
            num_blocks_free=self.kv.num_free_blocks,
            num_preemptions=s.num_preemptions,
            num_prompt_tokens=s.num_prompt_tokens,
            num_generation_tokens=s.num_generation_tokens,
            num_recomputed_tokens=s.num_recomputed_tokens,
            prefix_query_tokens=c.query_tokens,
            prefix_hit_tokens_device=c.hit_tokens_device,
            prefix_hit_tokens_host=c.hit_tokens_host,
            prefix_hit_tokens_pool=c.hit_tokens_pool,
            num_blocks_saved_on_preemption=c.blocks_saved_on_preemption,
            store=self.store_counters,
            kv_transfer=self.pd.counters(),
        )

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()

    def shutdown(self) -> None:
        self.executor.shutdown()
        self.pd.close()
        self.grammars.close()
