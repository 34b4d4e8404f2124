"""Triton causal flash attention of packed new queries over the paged KV cache (plain, chunked, prefix-cached prefill).

Online softmax over BLOCK_M x BLOCK_N tiles with tl.dot; keys and values are gathered token by token through the
block table. Reference: kernels/reference.py:prefill_attention.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgpt2.kernels.paged_attention import check_paged_cache, check_rows, new_buffer

_LOG2E = 1.4426950408889634

# H100 choices (not yet measured on the card) for head_dim 64.
PREFILL_BLOCK_M = 64
PREFILL_BLOCK_N = 64
PREFILL_NUM_WARPS = 4
PREFILL_NUM_STAGES = 2


def dot_config(dtype: torch.dtype, device: torch.device) -> tuple[bool, str]:
    """(UPCAST, DOT_PRECISION) constexprs for the tl.dot kernels on `dtype` tensors.

    Triton's CPU interpreter computes bfloat16 arithmetic on raw bits (numpy has no bfloat16), so on CPU bf16 tiles
    are widened to fp32 before the dot (UPCAST); bf16 products are exact in fp32, so only the rounding of P differs.
    fp32 dots follow torch's matmul precision: tf32 unless torch.get_float32_matmul_precision() is "highest".
    """
    upcast = dtype == torch.bfloat16 and device.type == "cpu"
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return upcast, "ieee"
    return upcast, "tf32"  # ignored by fp16/bf16 dots


@triton.jit
def dot_operand(x, UPCAST: tl.constexpr):
    """x widened to fp32 when UPCAST, else unchanged (the tensor-core operand dtype)."""
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _prefill_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, cu_seqlens_q_ptr, seq_lens_ptr, block_tables_ptr,
    qk_scale,
    stride_qn, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_btb,
    stride_on, stride_oh,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Program (query tile, b, h): read BLOCK_M * D of q and up to (prefix + end of tile) * D of K and of V ;
    # write BLOCK_M * D of out. Scores in log2 units, fp32 accumulation.
    m_block = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + b)
    q_len = tl.load(cu_seqlens_q_ptr + b + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    context_len = tl.load(seq_lens_ptr + b)
    prefix_len = context_len - q_len

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    pos_m = prefix_len + offs_m  # absolute position of each query
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qn + h * stride_qh + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    q = dot_operand(q, UPCAST)

    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Keys past the tile's last query position are causally invisible to every row of the tile.
    hi = tl.minimum(context_len, prefix_len + (m_block + 1) * BLOCK_M)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        block_ids = tl.load(block_tables_ptr + b * stride_btb + offs_n // BLOCK_SIZE, mask=n_mask, other=0)
        kv_offs = block_ids.to(tl.int64) * stride_kb + (offs_n % BLOCK_SIZE) * stride_ks + h * stride_kh
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = dot_operand(tl.load(k_cache_ptr + kv_offs[:, None] + offs_d[None, :], mask=kv_mask, other=0.0), UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        # Key 0 is visible to every row (padding rows included), so no row's running max stays -inf.
        visible = (offs_n[None, :] <= pos_m[:, None]) & n_mask[None, :]
        s = tl.where(visible, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        v = dot_operand(tl.load(v_cache_ptr + kv_offs[:, None] + offs_d[None, :], mask=kv_mask, other=0.0), UPCAST)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(out_ptr + rows[:, None] * stride_on + h * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    *,
    max_seqlen_q: int | None = None,
    out: torch.Tensor | None = None,
    block_m: int = PREFILL_BLOCK_M,
    block_n: int = PREFILL_BLOCK_N,
) -> torch.Tensor:
    """Causal attention of packed new queries over the paged cache.

    q : (N, H, D), last dim contiguous, the queries of B sequences back to back; cu_seqlens_q : (B+1,) int32;
    seq_lens : (B,) int32 total context per sequence (cached prefix + new queries, whose K/V are already cached);
    block_tables : (B, max_blocks) int32. Query i of sequence b sits at position seq_lens[b] - q_len_b + i.
    max_seqlen_q : longest q_len_b; pass it to avoid a host sync. out : optional (N, H, D) buffer in q's dtype.
    block_m, block_n : tile sizes (powers of two, >= 16). Returns (N, H, D) in q's dtype.
    """
    check_paged_cache(k_cache, v_cache, q.device)
    _, block_size, num_heads, head_dim = k_cache.shape
    check_rows("q", q, num_heads, head_dim)
    batch_size = seq_lens.shape[0]
    if cu_seqlens_q.shape != (batch_size + 1,) or cu_seqlens_q.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise ValueError(
            f"cu_seqlens_q must be ({batch_size + 1},) int32 and seq_lens ({batch_size},) int32, got "
            f"{tuple(cu_seqlens_q.shape)} {cu_seqlens_q.dtype} and {tuple(seq_lens.shape)} {seq_lens.dtype}"
        )
    if block_tables.dim() != 2 or block_tables.shape[0] != batch_size or block_tables.dtype != torch.int32:
        raise ValueError(
            f"block_tables must be ({batch_size}, max_blocks) int32, "
            f"got {tuple(block_tables.shape)} {block_tables.dtype}"
        )
    if any(t.device != q.device for t in (cu_seqlens_q, seq_lens, block_tables)):
        raise ValueError("cu_seqlens_q, seq_lens and block_tables must be on q's device")
    if out is None:
        out = new_buffer(q.shape, q.dtype, q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"out must be a {tuple(q.shape)} {q.dtype} tensor on {q.device} with a contiguous last dim")
    if q.shape[0] == 0 or batch_size == 0:
        return out
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    upcast, dot_precision = dot_config(q.dtype, q.device)
    block_tables = block_tables.contiguous()
    grid = (triton.cdiv(max_seqlen_q, block_m), batch_size, num_heads)
    _prefill_attention_kernel[grid](
        q, k_cache, v_cache, out, cu_seqlens_q.contiguous(), seq_lens.contiguous(), block_tables,
        scale * _LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        BLOCK_SIZE=block_size, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_M=block_m, BLOCK_N=block_n, UPCAST=upcast, DOT_PRECISION=dot_precision,
        num_warps=PREFILL_NUM_WARPS, num_stages=PREFILL_NUM_STAGES,
    )
    return out
