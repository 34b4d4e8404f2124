"""Triton FlashAttention-2 for the dense training path: forward saves the log-sum-exp, backward recomputes P.

Padded (B, H, T, D) batches or packed (N, H, D) sequences with cu_seqlens. Backward: delta = rowsum(dO * O), then one
kernel for dK/dV per key tile and one for dQ per query tile (no atomics). Reference: kernels/reference.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgpt2.kernels.flash_attention_bwd import flash_attention_backward, lse_strides, seq_strides
from fastgpt2.kernels.paged_attention import new_buffer
from fastgpt2.kernels.prefill_attention import dot_config, dot_operand

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# H100 choices for head_dim 64 (not yet measured on the card): (BLOCK_M, BLOCK_N, num_warps, num_stages).
FWD_CONFIG = (128, 64, 4, 3)
BWD_CONFIG = (64, 64, 4, 2)


@triton.jit
def _flash_attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_seqlens_ptr, qk_scale, padded_len,
    stride_qz, stride_qh, stride_qm, stride_kz, stride_kh, stride_kn, stride_vz, stride_vh, stride_vn,
    stride_oz, stride_oh, stride_om, stride_lz, stride_lh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Program (query tile, b, h): read BLOCK_M * D of q, up to T * D of k and of v ;
    # write BLOCK_M * D of o and BLOCK_M of lse.
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
    q = tl.load(q_ptr + b * stride_qz + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    q = dot_operand(q, UPCAST)
    k_base = k_ptr + b * stride_kz + h * stride_kh
    v_base = v_ptr + b * stride_vz + h * stride_vh

    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
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
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        visible = n_mask[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None])
        # Key 0 is visible to every row, so the first tile gives every running max a finite value.
        s = tl.where(visible, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        v = dot_operand(tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0), UPCAST)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(o_ptr + b * stride_oz + h * stride_oh + rows[:, None] * stride_om + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    # Natural-log lse of the scaled scores: P = exp(q.k * scale - lse) in the backward.
    tl.store(lse_ptr + b * stride_lz + h * stride_lh + rows, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=m_mask)


def _forward(q, k, v, causal, cu_seqlens, max_seqlen, config, dot):
    """Launch the forward; returns (out like q but contiguous, lse fp32 (B, H, T) padded or (H, N) packed)."""
    varlen = cu_seqlens is not None
    batch_size = cu_seqlens.shape[0] - 1 if varlen else q.shape[0]
    num_heads, head_dim = q.shape[1], q.shape[-1]
    block_m, block_n, num_warps, num_stages = config
    out = new_buffer(q.shape, q.dtype, q.device)
    lse_shape = (num_heads, q.shape[0]) if varlen else (batch_size, num_heads, q.shape[2])
    lse = new_buffer(lse_shape, torch.float32, q.device)
    _flash_attn_fwd_kernel[(triton.cdiv(max_seqlen, block_m), batch_size, num_heads)](
        q, k, v, out, lse, cu_seqlens if varlen else lse, head_dim ** -0.5 * _LOG2E, 0 if varlen else q.shape[2],
        *seq_strides(q, varlen), *seq_strides(k, varlen), *seq_strides(v, varlen), *seq_strides(out, varlen),
        *lse_strides(lse, varlen),
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_M=block_m, BLOCK_N=block_n,
        CAUSAL=causal, VARLEN=varlen, UPCAST=dot[0], DOT_PRECISION=dot[1], num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, cu_seqlens, max_seqlen, fwd_config, bwd_config):
        dot = dot_config(q.dtype, q.device)
        out, lse = _forward(q, k, v, causal, cu_seqlens, max_seqlen, fwd_config, dot)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.causal, ctx.max_seqlen, ctx.bwd_config, ctx.dot = causal, max_seqlen, bwd_config, dot
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(
            do, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.causal, ctx.bwd_config, ctx.dot
        )
        return dq, dk, dv, None, None, None, None, None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    cu_seqlens: torch.Tensor | None = None,
    *,
    max_seqlen: int | None = None,
    fwd_config: tuple[int, int, int, int] = FWD_CONFIG,
    bwd_config: tuple[int, int, int, int] = BWD_CONFIG,
) -> torch.Tensor:
    """Differentiable attention scaled by 1/sqrt(D), Triton forward and backward.

    Padded: q, k, v (B, H, T, D) (e.g. transposed views of the qkv projection; last dim contiguous). Packed: q, k, v
    (N, H, D) with cu_seqlens (B+1,) int32; attention never crosses a sequence boundary. max_seqlen : longest packed
    sequence; pass it to avoid a host sync. fwd_config, bwd_config : (BLOCK_M, BLOCK_N, num_warps, num_stages), tiles
    powers of two >= 16. Returns a contiguous tensor of q's shape and dtype.
    """
    varlen = cu_seqlens is not None
    if q.dim() != (3 if varlen else 4):
        raise ValueError(f"q must be {'(N, H, D) with cu_seqlens' if varlen else '(B, H, T, D)'}, got {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype from {_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError("q, k, v need a contiguous last dimension; call .contiguous() first")
    if k.device != q.device or v.device != q.device or (varlen and cu_seqlens.device != q.device):
        raise ValueError("q, k, v (and cu_seqlens) must be on one device")
    if varlen:
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32 or cu_seqlens.shape[0] < 2:
            raise ValueError(
                f"cu_seqlens must be (B+1,) int32 with B >= 1, got {tuple(cu_seqlens.shape)} {cu_seqlens.dtype}"
            )
        cu_seqlens = cu_seqlens.contiguous()
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    else:
        max_seqlen = q.shape[2]
    if q.numel() == 0 or max_seqlen == 0:
        return q.new_zeros(q.shape)
    return _FlashAttention.apply(q, k, v, causal, cu_seqlens, max_seqlen, fwd_config, bwd_config)
