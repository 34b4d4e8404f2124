"""Triton FlashAttention-2 backward: delta = rowsum(dO * O), then dK/dV per key tile and dQ per query tile.

Recomputes P from the forward's saved log-sum-exp; two kernels and no atomics. Used by kernels/flash_attention.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgpt2.kernels.paged_attention import new_buffer
from fastgpt2.kernels.prefill_attention import dot_operand

@triton.jit
def _flash_attn_bwd_preprocess_kernel(
    o_ptr, do_ptr, delta_ptr, cu_seqlens_ptr, padded_len,
    stride_oz, stride_oh, stride_om, stride_doz, stride_doh, stride_dom, stride_lz, stride_lh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, VARLEN: tl.constexpr,
):
    # Program (row tile, b, h): read 2 * BLOCK_M * D ; write BLOCK_M. delta = rowsum(dO * O) in fp32.
    m_block = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2)
    if VARLEN:
        seq_start = tl.load(cu_seqlens_ptr + b)
        seq_len = tl.load(cu_seqlens_ptr + b + 1) - seq_start
    else:
        seq_start = 0
        seq_len = padded_len
    if m_block * BLOCK_M >= seq_len:
        return
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < seq_len
    mask = m_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    rows = (seq_start + offs_m).to(tl.int64)
    o_offs = b * stride_oz + h * stride_oh + rows[:, None] * stride_om + offs_d[None, :]
    do_offs = b * stride_doz + h * stride_doh + rows[:, None] * stride_dom + offs_d[None, :]
    o = tl.load(o_ptr + o_offs, mask=mask, other=0.0)
    do = tl.load(do_ptr + do_offs, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(delta_ptr + b * stride_lz + h * stride_lh + rows, delta, mask=m_mask)


@triton.jit
def _flash_attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cu_seqlens_ptr, sm_scale, padded_len,
    stride_qz, stride_qh, stride_qm, stride_kz, stride_kh, stride_kn, stride_vz, stride_vh, stride_vn,
    stride_doz, stride_doh, stride_dom, stride_dkz, stride_dkh, stride_dkn, stride_lz, stride_lh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Program (key tile, b, h): read BLOCK_N * D of k and v, then per query tile 2 * BLOCK_M * D (q, dO) + 2 * BLOCK_M
    # (lse, delta) ; write BLOCK_N * D of dk and of dv (dk, dv share one layout). Works on transposed (N, M) tiles.
    n_block = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2)
    if VARLEN:
        seq_start = tl.load(cu_seqlens_ptr + b)
        seq_len = tl.load(cu_seqlens_ptr + b + 1) - seq_start
    else:
        seq_start = 0
        seq_len = padded_len
    start_n = n_block * BLOCK_N
    if start_n >= seq_len:
        return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < seq_len
    d_mask = offs_d < HEAD_DIM
    cols = (seq_start + offs_n).to(tl.int64)
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k_offs = b * stride_kz + h * stride_kh + cols[:, None] * stride_kn + offs_d[None, :]
    v_offs = b * stride_vz + h * stride_vh + cols[:, None] * stride_vn + offs_d[None, :]
    k = dot_operand(tl.load(k_ptr + k_offs, mask=kv_mask, other=0.0), UPCAST)
    v = dot_operand(tl.load(v_ptr + v_offs, mask=kv_mask, other=0.0), UPCAST)
    q_base = q_ptr + b * stride_qz + h * stride_qh
    do_base = do_ptr + b * stride_doz + h * stride_doh
    l_base = b * stride_lz + h * stride_lh
    qk_scale = sm_scale * 1.4426950408889634

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M  # earlier queries cannot see these keys
    else:
        lo = 0
    for m0 in range(lo, seq_len, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < seq_len
        rows = (seq_start + offs_m).to(tl.int64)
        row_mask = m_mask[:, None] & d_mask[None, :]
        q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :], mask=row_mask, other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dom + offs_d[None, :], mask=row_mask, other=0.0)
        q = dot_operand(q, UPCAST)
        do = dot_operand(do, UPCAST)
        lse = tl.load(lse_ptr + l_base + rows, mask=m_mask, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_ptr + l_base + rows, mask=m_mask, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        visible = n_mask[:, None] & m_mask[None, :]
        if CAUSAL:
            visible = visible & (offs_m[None, :] >= offs_n[:, None])
        p_t = tl.where(visible, tl.exp2(s_t - lse[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)

    dk_offs = b * stride_dkz + h * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :]
    tl.store(dk_ptr + dk_offs, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + dk_offs, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _flash_attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, cu_seqlens_ptr, sm_scale, padded_len,
    stride_qz, stride_qh, stride_qm, stride_kz, stride_kh, stride_kn, stride_vz, stride_vh, stride_vn,
    stride_doz, stride_doh, stride_dom, stride_dqz, stride_dqh, stride_dqm, stride_lz, stride_lh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Program (query tile, b, h): read 2 * BLOCK_M * D (q, dO) + 2 * BLOCK_M, then per key tile 2 * BLOCK_N * D (k, v) ;
    # write BLOCK_M * D of dq.
    m_block = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2)
    if VARLEN:
        seq_start = tl.load(cu_seqlens_ptr + b)
        seq_len = tl.load(cu_seqlens_ptr + b + 1) - seq_start
    else:
        seq_start = 0
        seq_len = padded_len
    if m_block * BLOCK_M >= seq_len:
        return
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < seq_len
    d_mask = offs_d < HEAD_DIM
    rows = (seq_start + offs_m).to(tl.int64)
    row_mask = m_mask[:, None] & d_mask[None, :]
    q_offs = b * stride_qz + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :]
    do_offs = b * stride_doz + h * stride_doh + rows[:, None] * stride_dom + offs_d[None, :]
    q = dot_operand(tl.load(q_ptr + q_offs, mask=row_mask, other=0.0), UPCAST)
    do = dot_operand(tl.load(do_ptr + do_offs, mask=row_mask, other=0.0), UPCAST)
    lse = tl.load(lse_ptr + b * stride_lz + h * stride_lh + rows, mask=m_mask, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + b * stride_lz + h * stride_lh + rows, mask=m_mask, other=0.0)
    k_base = k_ptr + b * stride_kz + h * stride_kh
    v_base = v_ptr + b * stride_vz + h * stride_vh
    qk_scale = sm_scale * 1.4426950408889634

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        hi = tl.minimum(seq_len, (m_block + 1) * BLOCK_M)
    else:
        hi = seq_len
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        cols = (seq_start + offs_n).to(tl.int64)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = dot_operand(tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0), UPCAST)
        v = dot_operand(tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0), UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        visible = m_mask[:, None] & n_mask[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None])
        p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    tl.store(dq_ptr + b * stride_dqz + h * stride_dqh + rows[:, None] * stride_dqm + offs_d[None, :],
             (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=row_mask)


def seq_strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, position) strides of a padded (B, H, T, D) or packed (N, H, D) tensor (packed: batch stride 0)."""
    return (0, t.stride(1), t.stride(0)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


def lse_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, int]:
    """(batch, head) strides of a (B, H, T) padded or (H, N) packed per-row fp32 buffer; rows have stride 1."""
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def flash_attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int,
    causal: bool,
    config: tuple[int, int, int, int],
    dot: tuple,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) for the forward that produced `out` and `lse` (see flash_attention.py for the layouts).

    config : (BLOCK_M, BLOCK_N, num_warps, num_stages); dot : (UPCAST, DOT_PRECISION) from dot_config.
    """
    varlen = cu_seqlens is not None
    batch_size = cu_seqlens.shape[0] - 1 if varlen else q.shape[0]
    num_heads, head_dim = q.shape[1], q.shape[-1]
    block_m, block_n, num_warps, num_stages = config
    block_d = max(16, triton.next_power_of_2(head_dim))
    if do.stride(-1) != 1:
        do = do.contiguous()
    dq = new_buffer(q.shape, q.dtype, q.device)
    dk = new_buffer(k.shape, k.dtype, k.device)
    dv = new_buffer(v.shape, v.dtype, v.device)
    delta = new_buffer(lse.shape, torch.float32, lse.device)  # lse's layout
    cu = cu_seqlens if varlen else lse  # unused pointer when not varlen
    padded_len = 0 if varlen else q.shape[2]
    ls = lse_strides(lse, varlen)
    shape = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, VARLEN=varlen)
    dots = dict(CAUSAL=causal, UPCAST=dot[0], DOT_PRECISION=dot[1], num_warps=num_warps, num_stages=num_stages)

    _flash_attn_bwd_preprocess_kernel[(triton.cdiv(max_seqlen, block_m), batch_size, num_heads)](
        out, do, delta, cu, padded_len, *seq_strides(out, varlen), *seq_strides(do, varlen), *ls,
        BLOCK_M=block_m, **shape,
    )
    inputs = (q, k, v, do, lse, delta)
    in_strides = (*seq_strides(q, varlen), *seq_strides(k, varlen), *seq_strides(v, varlen), *seq_strides(do, varlen))
    scale = head_dim ** -0.5
    _flash_attn_bwd_dkdv_kernel[(triton.cdiv(max_seqlen, block_n), batch_size, num_heads)](
        *inputs, dk, dv, cu, scale, padded_len, *in_strides, *seq_strides(dk, varlen), *ls,
        BLOCK_M=block_m, BLOCK_N=block_n, **shape, **dots,
    )
    _flash_attn_bwd_dq_kernel[(triton.cdiv(max_seqlen, block_m), batch_size, num_heads)](
        *inputs, dq, cu, scale, padded_len, *in_strides, *seq_strides(dq, varlen), *ls,
        BLOCK_M=block_m, BLOCK_N=block_n, **shape, **dots,
    )
    return dq, dk, dv
