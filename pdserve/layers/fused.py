"""Triton kernels for the small per-layer operations of a decode step on CUDA.

At batch 1 a Llama-3-8B decode step is its weight reads plus ~40 small kernels per layer (the norms'
pow/mean/rsqrt/mul, RoPE's index/cast/neg/cat/mul/add, SiLU and the product, residual adds, two KV
index copies), about 2 ms of an 8 ms step on an H100. These kernels do each group in one launch:

- add_rms_norm: residual += x (in place) and the RMSNorm of the sum;
- rope_: rotate q and k in place (neox layout);
- silu_mul: silu(gate) * up of the fused gate_up output;
- write_kv: K and V of the step into the paged cache at their slots.

Each rounds to the activation dtype where the torch reference does (after every elementwise op), so
its results are the torch path's bit for bit, except the norm's mean, which sums in another order.
The models call them when built with `fused=True` (the Triton attention backend on CUDA) and the head
dimension is a power of two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _add_rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    n_cols,
    eps,
    stride_x,
    stride_r,
    stride_o,
    HAS_RES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        total = (x + r).to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + row * stride_r + cols, total, mask=mask)
        x = total.to(tl.float32)
    mean_sq = tl.sum(x * x, axis=0) / n_cols
    y = (x * tl.rsqrt(mean_sq + eps)).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(x + residual) (of x without a residual); residual becomes x + residual. x: [n, hidden]."""
    n, hidden = x.shape
    out = torch.empty_like(x)
    res = residual if residual is not None else x
    _add_rms_norm_kernel[(n,)](
        x,
        res,
        weight,
        out,
        hidden,
        eps,
        x.stride(0),
        res.stride(0),
        out.stride(0),
        HAS_RES=residual is not None,
        BLOCK=triton.next_power_of_2(hidden),
        num_warps=8,
    )
    return out


@triton.jit
def _rotate(ptr, stride_h, num_heads, c, s, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """x * cos + rotate_half(x) * sin for the heads at ptr, rounding after each product and the sum as the torch
    path does."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, HALF)[None, :]
    mask = heads < num_heads
    first = ptr + heads * stride_h + d
    dtype = ptr.dtype.element_ty
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    # mul_rn: no multiply-add contraction, which would round differently from torch's separate kernels
    y1 = libdevice.mul_rn(x1, c).to(dtype).to(tl.float32) + libdevice.mul_rn(-x2, s).to(dtype).to(tl.float32)
    y2 = libdevice.mul_rn(x2, c).to(dtype).to(tl.float32) + libdevice.mul_rn(x1, s).to(dtype).to(tl.float32)
    tl.store(first, y1.to(dtype), mask=mask)
    tl.store(first + HALF, y2.to(dtype), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    q_stride_t,
    q_stride_h,
    k_stride_t,
    k_stride_h,
    cs_stride,
    NUM_Q: tl.constexpr,
    NUM_K: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t)
    d = tl.arange(0, HALF)[None, :]
    dtype = q_ptr.dtype.element_ty
    c = tl.load(cos_ptr + pos * cs_stride + d).to(dtype).to(tl.float32)  # the cache holds [freqs, freqs]
    s = tl.load(sin_ptr + pos * cs_stride + d).to(dtype).to(tl.float32)
    _rotate(q_ptr + t * q_stride_t, q_stride_h, NUM_Q, c, s, HALF, BLOCK_H)
    _rotate(k_ptr + t * k_stride_t, k_stride_h, NUM_K, c, s, HALF, BLOCK_H)


def rope_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate q [n, heads, head_dim] and k [n, kv_heads, head_dim] in place; cos, sin: [max_position, head_dim]."""
    n, num_q, head_dim = q.shape
    num_k = k.shape[1]
    if n == 0:
        return
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos.stride(1) == 1
    _rope_kernel[(n,)](
        q,
        k,
        positions,
        cos,
        sin,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos.stride(0),
        NUM_Q=num_q,
        NUM_K=num_k,
        HALF=head_dim // 2,
        BLOCK_H=triton.next_power_of_2(max(num_q, num_k)),
        num_warps=4,
    )


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, size, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < size
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + size + cols, mask=mask, other=0.0).to(tl.float32)
    # expf and a rounded division, as torch's silu (tl.exp and `/` are approximate)
    act = libdevice.div_rn(gate, 1.0 + libdevice.exp(-gate)).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (act * up).to(dtype), mask=mask)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [n, 2 * size] (gate, then up) -> silu(gate) * up, [n, size]."""
    n, width = x.shape
    size = width // 2
    out = torch.empty(n, size, dtype=x.dtype, device=x.device)
    block = 1024
    _silu_mul_kernel[(n, triton.cdiv(size, block))](x, out, size, x.stride(0), out.stride(0), BLOCK=block, num_warps=4)
    return out


@triton.jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    cache_ptr,
    slot_ptr,
    k_stride_t,
    k_stride_h,
    v_stride_t,
    v_stride_h,
    v_offset,
    NUM_K: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t)
    heads = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, HEAD_DIM)[None, :]
    mask = heads < NUM_K
    dst = cache_ptr + slot * (NUM_K * HEAD_DIM) + heads * HEAD_DIM + d
    k = tl.load(k_ptr + t * k_stride_t + heads * k_stride_h + d, mask=mask)
    v = tl.load(v_ptr + t * v_stride_t + heads * v_stride_h + d, mask=mask)
    tl.store(dst, k, mask=mask)
    tl.store(dst + v_offset, v, mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v: [n, kv_heads, head_dim] into one layer's cache [2, num_blocks, block_size, kv_heads, head_dim] at
    the flat slots `slot_mapping` [n]."""
    n, num_k, head_dim = k.shape
    if n == 0:
        return
    assert kv_cache.is_contiguous() and k.stride(2) == 1 and v.stride(2) == 1
    _write_kv_kernel[(n,)](
        k,
        v,
        kv_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        kv_cache[0].numel(),
        NUM_K=num_k,
        HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_k),
        num_warps=2,
    )
