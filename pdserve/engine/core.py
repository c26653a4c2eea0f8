"""The engine core: the one authority of an instance.

It validates requests, schedules every step, broadcasts the step plan to all
ranks through the executor and applies the result. It knows token ids, never
text.
"""

from __future__ import annotations

import logging
import time

from pdserve.config import DEFAULT_CPU_KV_CACHE_MEMORY, EngineConfig
from pdserve.kvcache import KVCacheManager
from pdserve.models.arch import ModelArch
from pdserve.models.loader import ModelSource, load_arch, resolve_model
from pdserve.request import FinishReason, Request, SamplingParams
from pdserve.scheduler.scheduler import RequestUpdate, Scheduler
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


def resolve_num_blocks(config: EngineConfig, arch: ModelArch, max_model_len: int) -> int:
    cache = config.cache
    tp = config.parallel.tensor_parallel_size
    bytes_per_block = arch.kv_bytes_per_token(DTYPE_SIZES[config.model.dtype], tp) * cache.block_size
    if cache.num_blocks is not None:
        num_blocks = cache.num_blocks
    else:
        memory = cache.kv_cache_memory or DEFAULT_CPU_KV_CACHE_MEMORY
        num_blocks = memory // bytes_per_block
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
        started = time.monotonic()
        self.executor: Executor
        if config.parallel.tensor_parallel_size == 1:
            self.executor = UniProcExecutor(config, self.source, self.arch, self.num_blocks, self.max_model_len)
        else:
            self.executor = MultiProcExecutor(config, self.num_blocks, self.max_model_len)
        logger.info("model %s loaded in %.1fs; KV cache %d blocks of %d tokens; max_model_len %d",
                    self.source.name, time.monotonic() - started, self.num_blocks,
                    config.cache.block_size, self.max_model_len)
        self.kv = KVCacheManager(self.num_blocks, config.cache.block_size)
        self.scheduler = Scheduler(config.scheduler, self.kv, self.max_model_len)
        self.eos_token_id = self.arch.eos_token_ids[0] if self.arch.eos_token_ids else None

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        """Raise ValueError naming the problem and the fix."""
        if not prompt_token_ids:
            raise ValueError("the prompt is empty; give at least one token")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_token_ids)} tokens; this model accepts at most "
                f"{self.max_model_len - 1} prompt tokens (max_model_len {self.max_model_len}, one left to generate); "
                "shorten the prompt or raise --max-model-len"
            )
        vocab = self.arch.vocab_size
        bad = next((t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad!r} is outside the vocabulary [0, {vocab})")

    def add_request(self, req_id: str, prompt_token_ids: list[int], sampling: SamplingParams) -> Request:
        self.validate_prompt(prompt_token_ids)
        request = Request(req_id, tuple(prompt_token_ids), sampling, self.eos_token_id, time.time())
        self.scheduler.add_request(request)
        logger.info("request %s added: %d prompt tokens, max_tokens %d", req_id, len(prompt_token_ids),
                    sampling.max_tokens)
        return request

    def abort(self, req_id: str) -> None:
        self.finish(req_id, FinishReason.ABORT)

    def finish(self, req_id: str, reason: FinishReason) -> None:
        """End a request from outside (abort, a stop string matched by the API server); frees its blocks."""
        request = self.scheduler.requests.get(req_id)
        if request is None:
            return
        self.scheduler.finish(req_id, reason)
        logger.info("request %s finished (%s): %d output tokens, %d preemptions", req_id, reason.value,
                    len(request.output_token_ids), request.num_preemptions)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def step(self) -> list[RequestUpdate]:
        sched = self.scheduler.schedule()
        if not sched.plan.seqs:
            return []
        output = self.executor.execute(sched.plan)
        updates = self.scheduler.update(sched, output)
        for update in updates:
            if update.finished:
                r = update.request
                logger.info("request %s finished (%s): %d output tokens, %d preemptions", r.req_id,
                            r.finish_reason.value if r.finish_reason else None, len(r.output_token_ids),
                            r.num_preemptions)
        return updates

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()

    def shutdown(self) -> None:
        self.executor.shutdown()
