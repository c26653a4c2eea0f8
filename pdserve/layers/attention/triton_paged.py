"""Paged attention in Triton (CUDA): one kernel for prefill, extend over a cached prefix and decode.

The flat batch is cut into query tiles: up to BLOCK_Q tokens of one sequence. A program takes one tile
and one KV head; its rows are the tile's tokens times the query heads that share that KV head (GQA: the
KV is read once for the whole group). It walks the sequence's KV blocks through its block table,
BLOCK_N tokens (several blocks) at a time, with an online softmax and a causal mask on absolute
positions (a tile's tokens sit at seq_len - q_len + i). Long contexts split the KV range over
`num_splits` programs (split-K); a second kernel merges their partial outputs by log-sum-exp. The KV
write stays torch's index_copy_ (one kernel, as fast as a custom one). prepare() builds the tiles on
the host and copies them to the device once per step; nothing syncs with the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pdserve.layers.attention.base import AttentionBackend, BatchLayout

BLOCK_Q = 16  # query tokens per tile (a decode tile has one)
BLOCK_N = 64  # KV tokens per inner step
SPLIT_MIN_TOKENS = 512  # split-K gives every split at least this many KV tokens
MAX_SPLITS = 16
TARGET_PROGRAMS = 256  # split until about this many programs run (a few waves on an H100's 132 SMs)


@triton.jit
def _paged_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lse_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    q_starts_ptr,
    q_lens_ptr,
    tile_seq_ptr,
    tile_q_ptr,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_ot,
    stride_oh,
    stride_os,
    stride_bt,
    stride_ls,
    scale,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    TILE_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(tile_seq_ptr + tile)
    tile_q = tl.load(tile_q_ptr + tile)  # the tile's first token, within the sequence's query tokens
    q_start = tl.load(q_starts_ptr + seq)
    q_len = tl.load(q_lens_ptr + seq)
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    token = tile_q + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < TILE_Q * GROUP) & (token < q_len)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q = tl.load(
        q_ptr + (q_start + token)[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    position = context + token  # each row attends to KV positions <= its own

    # the KV range of this split: [lo, hi) within what the tile's last token sees
    end = tl.minimum(seq_len, context + tile_q + TILE_Q)
    per_split = tl.cdiv(tl.cdiv(end, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(end, lo + per_split)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    cols = tl.arange(0, BLOCK_N)
    start = lo
    while start < hi:  # (a while loop: Triton's interpreter cannot range() over loaded bounds)
        n = start + cols
        n_ok = n < hi
        page = tl.load(block_tables_ptr + seq * stride_bt + n // PAGE, mask=n_ok, other=0)
        offset = page.to(tl.int64) * stride_kb + (n % PAGE) * stride_kt + kv_head * stride_kh
        kv_mask = n_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + offset[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(n_ok[None, :] & (n[None, :] <= position[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # rows with nothing seen yet keep m = -inf: subtract 0 there so no NaN appears
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + offset[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
        start += BLOCK_N

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    out_offset = (q_start + token)[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + out_offset, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    else:
        tl.store(out_ptr + split * stride_os + out_offset, out, mask=row_ok[:, None] & dim_ok[None, :])
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log(l_i))
        tl.store(lse_ptr + split * stride_ls + (q_start + token) * NUM_HEADS + head, lse, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    part_ptr,
    lse_ptr,
    out_ptr,
    stride_ps,
    stride_pt,
    stride_ph,
    stride_ls,
    stride_ot,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    splits = tl.arange(0, NUM_SPLITS)
    lse = tl.load(lse_ptr + splits * stride_ls + token * NUM_HEADS + head)
    top = tl.max(lse, 0)
    weight = tl.where(lse == float("-inf"), 0.0, tl.exp(lse - top))
    parts = tl.load(
        part_ptr + splits[:, None] * stride_ps + token * stride_pt + head * stride_ph + dims[None, :],
        mask=dim_ok[None, :],
        other=0.0,
    )
    out = tl.sum(parts * weight[:, None], 0) / tl.sum(weight, 0)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty), mask=dim_ok)


@dataclass
class TritonMetadata:
    slot_mapping: torch.Tensor  # [num_tokens]
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with 0
    seq_lens: torch.Tensor  # [num_seqs] int32
    q_starts: torch.Tensor  # [num_seqs] int32: each sequence's first token in the flat batch
    q_lens: torch.Tensor  # [num_seqs] int32
    tile_seq: torch.Tensor  # [num_tiles] int32
    tile_q: torch.Tensor  # [num_tiles] int32
    tile_q_len: int  # tokens per tile: BLOCK_Q, or 1 when every sequence decodes
    num_splits: int


def plan_splits(num_tiles: int, num_kv_heads: int, max_kv_len: int) -> int:
    """How many programs share one tile's KV range: enough to fill the GPU, each with at least
    SPLIT_MIN_TOKENS tokens, a power of two."""
    programs = max(1, num_tiles * num_kv_heads)
    splits = 1
    while (
        splits * 2 <= MAX_SPLITS and programs * splits < TARGET_PROGRAMS and max_kv_len >= SPLIT_MIN_TOKENS * splits * 2
    ):
        splits *= 2
    return splits


class TritonAttention(AttentionBackend):
    def prepare(self, layout: BatchLayout, device: torch.device) -> TritonMetadata:
        tile_len = 1 if all(n == 1 for n in layout.q_lens) else BLOCK_Q
        tile_seq, tile_q, q_starts, max_blocks = [], [], [], 1
        start = 0
        for i, (q_len, seq_len) in enumerate(zip(layout.q_lens, layout.seq_lens)):
            q_starts.append(start)
            start += q_len
            for t in range(0, q_len, tile_len):
                tile_seq.append(i)
                tile_q.append(t)
            max_blocks = max(max_blocks, -(-seq_len // layout.block_size))
        tables = [t[:max_blocks] + [0] * (max_blocks - len(t[:max_blocks])) for t in layout.block_tables]
        host = torch.tensor([*layout.seq_lens, *q_starts, *layout.q_lens, *tile_seq, *tile_q], dtype=torch.int32)
        on_device = host.to(device, non_blocking=True)
        n, m = len(layout.q_lens), len(tile_seq)
        decode_only = tile_len == 1
        num_splits = plan_splits(m, self.num_kv_heads, max(layout.seq_lens)) if decode_only else 1
        return TritonMetadata(
            slot_mapping=layout.slot_mapping.to(device, non_blocking=True),
            block_tables=torch.tensor(tables, dtype=torch.int32).to(device, non_blocking=True),
            seq_lens=on_device[:n],
            q_starts=on_device[n : 2 * n],
            q_lens=on_device[2 * n : 3 * n],
            tile_seq=on_device[3 * n : 3 * n + m],
            tile_q=on_device[3 * n + m :],
            tile_q_len=tile_len,
            num_splits=num_splits,
        )

    def forward(self, q, k, v, kv_cache, metadata: TritonMetadata):  # type: ignore[no-untyped-def, override]
        num_tokens = q.shape[0]
        k_cache, v_cache = self.write_kv(k, v, kv_cache, metadata.slot_mapping)
        out = torch.empty(num_tokens, self.num_heads, self.head_dim, dtype=q.dtype, device=q.device)
        paged_attention(q, k_cache, v_cache, out, metadata, self.scale)
        return out.view(num_tokens, self.num_heads * self.head_dim)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    metadata: TritonMetadata,
    scale: float,
) -> None:
    """out[t, h] = softmax over the sequence's visible KV of q[t, h] . k; see the module docstring."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    block_m = max(16, triton.next_power_of_2(metadata.tile_q_len * group))
    block_d = triton.next_power_of_2(head_dim)
    splits = metadata.num_splits
    num_tiles = metadata.tile_seq.shape[0]
    if splits == 1:
        part, lse = out, out  # lse unused
        stride_os, stride_ls = 0, 0
    else:
        part = torch.empty(splits, num_tokens, num_heads, head_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(splits, num_tokens, num_heads, dtype=torch.float32, device=q.device)
        stride_os, stride_ls = part.stride(0), lse.stride(0)
    out_strides = (part.stride(1), part.stride(2)) if splits > 1 else (out.stride(0), out.stride(1))
    _paged_attention_kernel[(num_tiles, num_kv_heads, splits)](
        q,
        k_cache,
        v_cache,
        part,
        lse,
        metadata.block_tables,
        metadata.seq_lens,
        metadata.q_starts,
        metadata.q_lens,
        metadata.tile_seq,
        metadata.tile_q,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        out_strides[0],
        out_strides[1],
        stride_os,
        metadata.block_tables.stride(0),
        stride_ls,
        scale,
        NUM_HEADS=num_heads,
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        PAGE=k_cache.shape[1],
        TILE_Q=metadata.tile_q_len,
        BLOCK_M=block_m,
        BLOCK_N=max(BLOCK_N, k_cache.shape[1]),
        NUM_SPLITS=splits,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    if splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](
            part,
            lse,
            out,
            part.stride(0),
            part.stride(1),
            part.stride(2),
            lse.stride(0),
            out.stride(0),
            out.stride(1),
            NUM_HEADS=num_heads,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            NUM_SPLITS=splits,
        )
