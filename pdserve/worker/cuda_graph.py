"""CUDA graphs for decode steps: the whole model forward of a batch of single-token sequences, replayed.

A decode step of a small model is mostly kernel launches; replaying a captured graph removes them. One
graph per batch size in `capture_sizes` (a batch runs in the smallest graph that holds it; the extra
rows write their KV into a scratch block that no request owns and attend only to it). Every graph
reads its inputs from the same static buffers: token ids, positions, KV slots, and the Triton
backend's metadata (block tables as wide as max_model_len, sequence lengths). The attention kernel
reads its KV range from the sequence lengths, so one graph serves every context length; its split-K
count is fixed per batch size at capture (splits past a short context do nothing). Logits and
sampling stay outside the graph. Used only with one rank (no collectives in the graph), the Triton
backend and no per-layer hook (a PD prefill never decodes).
"""

from __future__ import annotations

import logging
import time

import torch

from pdserve.layers.attention.triton_paged import TritonMetadata, plan_splits

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 256


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 up to 64, then 16 up to max_num_seqs (at most DEFAULT_MAX_BATCH)."""
    limit = min(max_num_seqs, DEFAULT_MAX_BATCH)
    sizes = [s for s in (1, 2, 4) if s <= limit]
    sizes += list(range(8, min(limit, 64) + 1, 8)) + list(range(80, limit + 1, 16))
    if sizes[-1] < limit:
        sizes.append(limit)
    return sizes


class DecodeGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: torch.Tensor,
        scratch_block: int,
        max_model_len: int,
        max_num_seqs: int,
        num_kv_heads: int,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.shape[3]
        self.scratch_block = scratch_block
        self.sizes = capture_sizes(max_num_seqs)
        device = kv_cache.device
        n, width = self.sizes[-1], -(-max_model_len // self.block_size)
        self.width = width
        self.token_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slots = torch.full((n,), scratch_block * self.block_size, dtype=torch.int64, device=device)
        self.block_tables = torch.full((n, width), scratch_block, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.arange = torch.arange(n, dtype=torch.int32, device=device)
        self.zeros = torch.zeros(n, dtype=torch.int32, device=device)
        self.ones = torch.ones(n, dtype=torch.int32, device=device)
        # host staging: one pinned buffer per step, copied in one go
        self._host_ids = torch.zeros(3, n, dtype=torch.int64, pin_memory=True)
        self._host_tables = torch.full((n, width + 1), scratch_block, dtype=torch.int32, pin_memory=True)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.num_kv_heads = num_kv_heads
        self.max_model_len = max_model_len

    def _metadata(self, size: int) -> TritonMetadata:
        return TritonMetadata(
            slot_mapping=self.slots[:size],
            block_tables=self.block_tables[:size],
            seq_lens=self.seq_lens[:size],
            q_starts=self.arange[:size],
            q_lens=self.ones[:size],
            tile_seq=self.arange[:size],
            tile_q=self.zeros[:size],
            tile_q_len=1,
            num_splits=plan_splits(size, self.num_kv_heads, self.max_model_len),
        )

    @torch.inference_mode()
    def capture(self) -> None:
        started = time.monotonic()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for size in reversed(self.sizes):  # the largest first: the smaller ones reuse its memory
            meta = self._metadata(size)
            args = (self.token_ids[:size], self.positions[:size], self.kv_cache, meta)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up (Triton compiles, allocator settles) outside the graph
                    self.model(*args)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self.outputs[size] = self.model(*args)
            self.graphs[size] = graph
        torch.cuda.synchronize()
        logger.info(
            "captured %d CUDA graphs for decode batches of %s sequences in %.1fs",
            len(self.graphs),
            self.sizes,
            time.monotonic() - started,
        )

    def fits(self, num_seqs: int) -> bool:
        return num_seqs <= self.sizes[-1]

    @torch.inference_mode()
    def run(
        self, token_ids: list[int], positions: list[int], slots: list[int], block_tables: list[list[int]]
    ) -> torch.Tensor:
        """Hidden states [len(token_ids), hidden] of one decode step (one token per sequence)."""
        n = len(token_ids)
        size = next(s for s in self.sizes if s >= n)
        ids = self._host_ids
        ids[0, :n] = torch.tensor(token_ids)
        ids[1, :n] = torch.tensor(positions)
        ids[2, :n] = torch.tensor(slots)
        tables = self._host_tables
        width = max(len(t) for t in block_tables)
        tables[:n, :width] = torch.tensor(
            [t + [self.scratch_block] * (width - len(t)) for t in block_tables], dtype=torch.int32
        )
        tables[:n, width] = torch.tensor(positions, dtype=torch.int32) + 1  # the sequence lengths
        self.token_ids[:n].copy_(ids[0, :n], non_blocking=True)
        self.positions[:n].copy_(ids[1, :n], non_blocking=True)
        self.slots[:n].copy_(ids[2, :n], non_blocking=True)
        self.block_tables[:n, :width].copy_(tables[:n, :width], non_blocking=True)
        self.seq_lens[:n].copy_(tables[:n, width], non_blocking=True)
        # rows past n keep the scratch block and length 1 from the last larger step: reset them
        if size > n:
            self.slots[n:size].fill_(self.scratch_block * self.block_size)
            self.block_tables[n:size, 0].fill_(self.scratch_block)
            self.seq_lens[n:size].fill_(1)
        self.graphs[size].replay()
        return self.outputs[size][:n]
