"""Executes one step plan on this rank: builds the flat batch, runs the model, samples.

Owns this rank's KV cache: one allocation
[num_layers, 2, num_blocks, block_size, num_kv_heads / tp, head_dim], and its
host tier and pool client (worker.kv_tiers), whose copies run around the forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from pdserve.config import EngineConfig
from pdserve.disagg.plane import kv_plane
from pdserve.layers.attention import BatchLayout
from pdserve.layers.device import to_device
from pdserve.layers.parallel import get_tp_group
from pdserve.layers.sampler import Sampler
from pdserve.messages import ForwardOutput, KVRegion, PoolRead, PromptLogprob, StepPlan, StoreCounters
from pdserve.models import build_model
from pdserve.models.arch import ModelArch
from pdserve.models.loader import ModelSource
from pdserve.worker.kv_tiers import KVTiers

if TYPE_CHECKING:
    from pdserve.worker.cuda_graph import DecodeGraphs

PROMPT_SCORE_ROWS = 256  # prompt rows turned into logits at once when scoring a prompt
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        source: ModelSource,
        arch: ModelArch,
        num_blocks: int,
        num_host_blocks: int,
        max_model_len: int,
    ) -> None:
        tp = get_tp_group()
        self.device = torch.device(config.parallel.resolved_device())
        if self.device.type == "cuda":  # this rank's GPU, current for everything the runner does
            self.device = torch.device("cuda", config.parallel.gpu_id(tp.rank))
        with self.on_device():
            self._build(config, source, arch, num_blocks, num_host_blocks, max_model_len)

    def on_device(self) -> contextlib.AbstractContextManager[None]:
        """This rank's GPU as the current device (an engine process may drive runners on several)."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def _build(
        self,
        config: EngineConfig,
        source: ModelSource,
        arch: ModelArch,
        num_blocks: int,
        num_host_blocks: int,
        max_model_len: int,
    ) -> None:
        self.dtype = TORCH_DTYPES[config.model.dtype]
        self.block_size = config.cache.block_size
        self.model = build_model(
            arch,
            source,
            self.dtype,
            self.device,
            max_position=max_model_len,
            attention_backend=config.parallel.resolved_attention_backend(),
            seed=config.model.seed,
        )
        tp = get_tp_group()
        parallel = config.parallel
        self.plane = kv_plane(config.disagg)  # this rank's side of the PD role and transfer mode
        use_graphs = (
            self.device.type == "cuda"
            and tp.size == 1
            and not parallel.enforce_eager
            and parallel.resolved_attention_backend() == "triton"
            and self.plane.allows_decode_graphs
        )
        # CUDA graphs pad a batch with rows that write into a scratch block past the managed ones
        shape = (
            arch.num_layers,
            2,
            num_blocks + int(use_graphs),
            self.block_size,
            arch.num_kv_heads // tp.size,
            arch.head_dim,
        )
        self.kv_cache = self.plane.allocate_cache(shape, self.dtype, self.device, tp.rank)
        self.sampler = Sampler(self.device, seed=config.model.seed)
        self.sampled_vocab_size = config.model.sampled_vocab_size
        self.backend = self.model.attention_backend
        self.tiers = (
            KVTiers(self.kv_cache, num_host_blocks, tp.rank, config.cache.kv_store, config.cache.kv_store_options)
            if num_host_blocks
            else None
        )
        self.plane.open(self.kv_cache, tp.rank, arch.num_layers)
        self.sender = self.plane.sender
        self.graphs: DecodeGraphs | None = None
        if use_graphs:
            from pdserve.worker.cuda_graph import DecodeGraphs  # imports Triton

            self.graphs = DecodeGraphs(
                self.model, self.kv_cache, num_blocks, max_model_len, config.scheduler.max_num_seqs, arch.num_kv_heads
            )
            self.graphs.capture()

    def regions(self) -> list[KVRegion]:
        """How peers can write into this rank's KV cache (empty when this instance is mixed)."""
        return self.plane.regions()

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> ForwardOutput:
        with self.on_device():
            return self._execute(plan)

    def _execute(self, plan: StepPlan) -> ForwardOutput:
        if self.tiers is not None:
            self.tiers.copy(plan.cache_ops)
        for src, dst in plan.cache_ops.device_copy:  # after the swap-outs: dst may have held an evicted block
            self.kv_cache[:, :, dst].copy_(self.kv_cache[:, :, src])
        if plan.kv_sends and self.sender is None:
            raise RuntimeError(
                "the plan has KV sends but this instance runs no transfer engine (is it a prefill instance?)"
            )
        sender = self.sender if plan.kv_sends else None
        if sender is not None:
            sender.begin(plan.step_id, plan.kv_sends)
        output = self._forward(plan, sender.layer_done if sender is not None and sender.has_layerwise else None)
        if sender is not None:
            output.kv_sent = [sender.finish()]
        if plan.pool_sends:
            if self.tiers is None:
                raise RuntimeError("the plan has pool sends but this instance has no host tier and pool")
            output.kv_sent = [self.tiers.send(plan.pool_sends)]
        if self.tiers is not None:
            self.tiers.put(plan.cache_ops)
            output.pool_read = [self._read_pool(read) for read in plan.pool_reads]
            output.store = self.tiers.counters
        elif plan.pool_reads:
            raise RuntimeError("the plan has pool reads but this instance has no host tier and pool")
        return output

    def _read_pool(self, read: PoolRead) -> int:
        """Count a waiting request's leading blocks in the pool, or read them into host blocks."""
        assert self.tiers is not None
        if not read.host_block_ids:
            return self.tiers.count_present(read.keys)
        return self.tiers.load(read.keys, read.host_block_ids)

    def load_from_pool(self, keys: list[str], host_block_ids: list[int]) -> int:
        """Read blocks from the pool into the host tier; how many leading blocks were read (storage-mode D's
        prompt reads, outside a step)."""
        with self.on_device():
            return self.tiers.load(keys, host_block_ids) if self.tiers is not None else 0

    def store_counters(self) -> StoreCounters:
        return self.tiers.counters if self.tiers is not None else StoreCounters()

    def close(self) -> None:
        if self.tiers is not None:
            self.tiers.close()
        self.plane.close()

    def _forward(self, plan: StepPlan, layer_done: Callable[[int], None] | None = None) -> ForwardOutput:
        self.sampler.forget(plan.finished_req_ids)
        if not plan.seqs:
            return ForwardOutput(step_id=plan.step_id, req_ids=[], token_ids=[])
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        bs = self.block_size
        for seq in plan.seqs:
            token_ids += seq.token_ids
            span = range(seq.start_pos, seq.start_pos + len(seq.token_ids))
            positions += span
            slots += [seq.block_ids[p // bs] * bs + p % bs for p in span]
            if seq.sample:
                sample_rows.append(len(token_ids) - 1)
        if (
            self.graphs is not None
            and layer_done is None
            and self.graphs.fits(len(plan.seqs))
            and all(len(s.token_ids) == 1 and s.start_pos > 0 and s.sample and s.prompt_logprobs < 0 for s in plan.seqs)
        ):
            hidden = self.graphs.run(token_ids, positions, slots, [s.block_ids for s in plan.seqs])
            return self._sample(plan, hidden)
        layout = BatchLayout(
            q_lens=[len(s.token_ids) for s in plan.seqs],
            seq_lens=[s.start_pos + len(s.token_ids) for s in plan.seqs],
            block_tables=[s.block_ids for s in plan.seqs],
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            block_size=bs,
        )
        meta = self.backend.prepare(layout, self.device)
        hidden = self.model(
            torch.tensor(token_ids, device=self.device),
            torch.tensor(positions, device=self.device),
            self.kv_cache,
            meta,
            layer_done,
        )
        scored = self._score_prompts(plan, hidden) if any(s.prompt_logprobs >= 0 for s in plan.seqs) else {}
        if len(sample_rows) != hidden.shape[0]:  # (a decode-only batch samples every row)
            hidden = hidden.index_select(0, to_device(sample_rows, self.device, torch.int64))
        output = self._sample(plan, hidden)
        output.prompt_logprobs = scored
        return output

    def _score_prompts(self, plan: StepPlan, hidden: torch.Tensor) -> dict[str, tuple[int, list[PromptLogprob]]]:
        """Each scoring chunk's prompt tokens: the logprob and rank of the token after each row, and the top k."""
        scored = {}
        row = 0
        for seq in plan.seqs:
            rows = len(seq.token_ids)
            if seq.prompt_logprobs >= 0:
                targets = seq.token_ids[1:] + ([seq.prompt_next_token] if seq.prompt_next_token >= 0 else [])
                scores: list[PromptLogprob] = []
                for at in range(0, len(targets), PROMPT_SCORE_ROWS):  # bounded [rows, vocab] logits
                    part = targets[at : at + PROMPT_SCORE_ROWS]
                    logits = self.model.compute_logits(hidden[row + at : row + at + len(part)]).float()
                    if self.sampled_vocab_size is not None:
                        logits = logits[:, : self.sampled_vocab_size]
                    scores += _prompt_scores(logits.log_softmax(dim=-1), part, seq.prompt_logprobs)
                scored[seq.req_id] = (seq.start_pos + 1, scores)
            row += rows
        return scored

    def _sample(self, plan: StepPlan, hidden: torch.Tensor) -> ForwardOutput:
        """hidden: [sampled sequences, hidden], in plan order."""
        sampled = [s for s in plan.seqs if s.sample]
        if not sampled:
            return ForwardOutput(step_id=plan.step_id, req_ids=[], token_ids=[])
        logits = self.model.compute_logits(hidden)
        if self.sampled_vocab_size is not None:
            logits = logits[:, : self.sampled_vocab_size]
        req_ids = [s.req_id for s in sampled]
        tokens, logprobs = self.sampler(logits, req_ids, [s.sampling for s in sampled])
        return ForwardOutput(step_id=plan.step_id, req_ids=req_ids, token_ids=tokens, logprobs=logprobs)


def _prompt_scores(logprobs: torch.Tensor, targets: list[int], k: int) -> list[PromptLogprob]:
    """logprobs [rows, vocab]: each row's target token's logprob and rank (1 = the most likely), and the top k;
    one host copy."""
    target_ids = torch.tensor(targets, device=logprobs.device)[:, None]
    chosen = logprobs.gather(1, target_ids)
    ranks = (logprobs > chosen).sum(dim=-1, keepdim=True) + 1
    top_values, top_ids = logprobs.topk(max(k, 1), dim=-1)
    packed = torch.cat([chosen.double(), ranks.double(), top_values.double(), top_ids.double()], dim=1).tolist()
    width = max(k, 1)
    return [
        PromptLogprob(r[0], int(r[1]), [(int(i), v) for i, v in zip(r[2 + width : 2 + width + k], r[2 : 2 + k])])
        for r in packed
    ]
