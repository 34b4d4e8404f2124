"""Triton kernels for the paged KV cache: the cache write and single-query decode attention with split-K.

Decode splits each sequence's context across programs when B * H alone cannot fill the GPU (flash-decoding), then
merges the partial softmaxes exactly through their log-sum-exps. References: kernels/reference.py, same names.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# H100 choices (not yet measured on the card): a 64-token tile keeps a (64, 64) K and V tile per program in registers.
DECODE_BLOCK_N = 64
DECODE_NUM_WARPS = 4
# Split-K: aim for this many programs per SM, and never make a split shorter than this many tokens.
DECODE_PROGRAMS_PER_SM = 2
DECODE_MIN_PARTITION = 128

# Tests set this so every buffer a wrapper allocates starts as NaN: an element a kernel forgets to write then fails the
# comparison instead of passing on leftover memory.
POISON_BUFFERS = False


def new_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, or a NaN-filled tensor while POISON_BUFFERS is set."""
    if POISON_BUFFERS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def check_paged_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, device: torch.device) -> None:
    """Raise ValueError unless k_cache, v_cache are matching contiguous (num_blocks, block_size, H, D) on `device`."""
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must both be (num_blocks, block_size, H, D), got {tuple(k_cache.shape)} "
            f"and {tuple(v_cache.shape)}"
        )
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous; allocate the pool with torch.empty, not a view")
    if k_cache.dtype not in _DTYPES or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"KV cache dtype must be one of {_DTYPES} in both caches, got {k_cache.dtype}/{v_cache.dtype}")
    if k_cache.device != device or v_cache.device != device:
        raise ValueError(f"KV cache is on {k_cache.device}/{v_cache.device} but the tokens are on {device}")


def check_rows(name: str, t: torch.Tensor, num_heads: int, head_dim: int) -> None:
    """Raise ValueError unless t is (N, num_heads, head_dim) with a unit stride on the last dim."""
    if t.dim() != 3 or t.shape[1:] != (num_heads, head_dim):
        raise ValueError(f"{name} must be (N, {num_heads}, {head_dim}) to match the cache, got {tuple(t.shape)}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension; call .contiguous() first")


@triton.jit
def _reshape_and_cache_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_kn, stride_kh, stride_vn, stride_vh,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_HD: tl.constexpr,
):
    # One program per token: read H*D elements of k and v ; write the same into one cache slot (or nothing).
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    offs = tl.arange(0, BLOCK_HD)
    mask = offs < NUM_HEADS * HEAD_DIM
    head = offs // HEAD_DIM
    dim = offs % HEAD_DIM
    k = tl.load(k_ptr + token * stride_kn + head * stride_kh + dim, mask=mask)
    v = tl.load(v_ptr + token * stride_vn + head * stride_vh + dim, mask=mask)
    # The cache is contiguous, so a slot is a run of H*D elements.
    dst = slot * (NUM_HEADS * HEAD_DIM) + offs
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write k[i], v[i] into cache slot slot_mapping[i]; slot -1 skips token i.

    k, v : (N, H, D) any float dtype, last dim contiguous; k_cache, v_cache : (num_blocks, block_size, H, D) contiguous;
    slot_mapping : (N,) int64.
    """
    check_paged_cache(k_cache, v_cache, k.device)
    _, _, num_heads, head_dim = k_cache.shape
    check_rows("k", k, num_heads, head_dim)
    check_rows("v", v, num_heads, head_dim)
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype != torch.int64 or v.shape[0] != k.shape[0]:
        raise ValueError(
            f"slot_mapping must be ({k.shape[0]},) int64 like k, got {tuple(slot_mapping.shape)} {slot_mapping.dtype}"
        )
    if slot_mapping.device != k.device or v.device != k.device:
        raise ValueError("k, v and slot_mapping must be on the same device as the cache")
    if k.shape[0] == 0:
        return
    _reshape_and_cache_kernel[(k.shape[0],)](
        k, v, k_cache, v_cache, slot_mapping.contiguous(),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_HD=triton.next_power_of_2(num_heads * head_dim),
        num_warps=4,
    )


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    qk_scale, partition_size,
    stride_qb, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_btb,
    stride_ob, stride_oh,
    stride_pb, stride_ph, stride_ps,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
):
    # Program (b, h, split): read D of q, up to partition_size * D of K and of V through the block table ;
    # write D of out (SPLIT=False), or D of partial out + 1 lse (SPLIT=True). fp32 throughout; scores in log2 units.
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    start = split * partition_size
    end = tl.minimum(start + partition_size, seq_len)

    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    q = q * qk_scale
    m_i = -float("inf")
    l_i = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        block_ids = tl.load(block_tables_ptr + b * stride_btb + offs_n // BLOCK_SIZE, mask=n_mask, other=0)
        kv_offs = block_ids.to(tl.int64) * stride_kb + (offs_n % BLOCK_SIZE) * stride_ks + h * stride_kh
        kv_mask = n_mask[:, None] & d_mask[None, :]
        # Masked loads never touch slots past seq_len, so whatever they hold (NaN included) cannot leak in.
        k = tl.load(k_cache_ptr + kv_offs[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1)  # (BLOCK_N,)
        s = tl.where(n_mask, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))  # finite: every tile holds at least one valid token
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        v = tl.load(v_cache_ptr + kv_offs[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new

    if SPLIT:
        # An empty split (start >= seq_len) leaves l_i = 0: it stores out 0 and lse -inf, i.e. weight 0 in the merge.
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        part = b * stride_pb + h * stride_ph + split * stride_ps
        tl.store(part_out_ptr + part * HEAD_DIM + offs_d, acc / l_safe, mask=d_mask)
        tl.store(part_lse_ptr + part, tl.where(l_i > 0.0, m_i + tl.log2(l_safe), -float("inf")))
    else:
        out = acc / l_i
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _paged_decode_merge_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, num_splits,
    stride_pb, stride_ph, stride_ps,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # Program (b, h): read num_splits * (D + 1) partials ; write D. out = sum_s 2^(lse_s - LSE) * out_s.
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < HEAD_DIM
    part = b * stride_pb + h * stride_ph + offs_s * stride_ps  # (BLOCK_S,)
    lse = tl.load(part_lse_ptr + part, mask=s_mask, other=-float("inf"))
    weights = tl.exp2(lse - tl.max(lse, axis=0))  # split 0 is never empty, so the max is finite
    parts = tl.load(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :],
                    other=0.0)
    out = tl.sum(weights[:, None] * parts, axis=0) / tl.sum(weights, axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_plan(num_programs: int, max_context: int, device: torch.device, num_splits: int | None) -> tuple[int, int]:
    """(partition_size, num_splits) for decode: tokens per split and splits per (sequence, head).

    num_programs is B * H and max_context the block-table width in tokens. When num_splits is None, CUDA gets enough
    splits for DECODE_PROGRAMS_PER_SM programs per SM, each at least DECODE_MIN_PARTITION tokens; CPU gets one.
    A requested count is honoured up to rounding the partition to whole 16-token (or BLOCK_N-token) tiles.
    """
    if num_splits is None:
        num_splits = 1
        if device.type == "cuda":
            num_sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
            wanted = triton.cdiv(DECODE_PROGRAMS_PER_SM * num_sms, num_programs)
            num_splits = max(1, min(wanted, triton.cdiv(max_context, DECODE_MIN_PARTITION)))
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    partition_size = triton.cdiv(max_context, num_splits)
    align = DECODE_BLOCK_N if partition_size >= DECODE_BLOCK_N else 16  # whole tiles, except when forced small
    partition_size = triton.cdiv(partition_size, align) * align
    return partition_size, triton.cdiv(max_context, partition_size)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """One query per sequence against its first seq_lens[b] cached tokens (flash-decoding when B * H is small).

    q : (B, H, D), last dim contiguous; block_tables : (B, max_blocks) int32; seq_lens : (B,) int32, each in
    [1, max_blocks * block_size]. out : optional (B, H, D) buffer in q's dtype. num_splits : context splits per
    (sequence, head); default picks enough to fill the GPU, sized by the block-table width (no host sync), so pass
    tables only as wide as the longest sequence needs. Returns (B, H, D) in q's dtype.
    """
    check_paged_cache(k_cache, v_cache, q.device)
    _, block_size, num_heads, head_dim = k_cache.shape
    check_rows("q", q, num_heads, head_dim)
    batch_size = q.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != batch_size or block_tables.dtype != torch.int32:
        raise ValueError(
            f"block_tables must be ({batch_size}, max_blocks) int32, "
            f"got {tuple(block_tables.shape)} {block_tables.dtype}"
        )
    if seq_lens.shape != (batch_size,) or seq_lens.dtype != torch.int32:
        raise ValueError(f"seq_lens must be ({batch_size},) int32, got {tuple(seq_lens.shape)} {seq_lens.dtype}")
    if block_tables.device != q.device or seq_lens.device != q.device:
        raise ValueError("block_tables and seq_lens must be on q's device")
    if out is None:
        out = new_buffer(q.shape, q.dtype, q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"out must be a {tuple(q.shape)} {q.dtype} tensor on {q.device} with a contiguous last dim")
    if batch_size == 0:
        return out
    block_tables = block_tables.contiguous()
    partition_size, num_splits = split_plan(batch_size * num_heads, block_tables.shape[1] * block_size, q.device,
                                            num_splits)

    block_d = triton.next_power_of_2(head_dim)
    common = dict(BLOCK_SIZE=block_size, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=DECODE_BLOCK_N,
                  num_warps=DECODE_NUM_WARPS)
    args = (q, k_cache, v_cache, block_tables, seq_lens.contiguous(), out)
    strides = (q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
               block_tables.stride(0), out.stride(0), out.stride(1))
    qk_scale = scale * _LOG2E
    if num_splits == 1:
        _paged_decode_kernel[(batch_size, num_heads, 1)](
            *args, out, out, qk_scale, partition_size, *strides, 0, 0, 0, SPLIT=False, **common
        )
        return out
    # (B, H, S, D) partial outputs and (B, H, S) log2-sum-exps, fp32: 4 * (D + 1) bytes per split.
    part_out = new_buffer((batch_size, num_heads, num_splits, head_dim), torch.float32, q.device)
    part_lse = new_buffer((batch_size, num_heads, num_splits), torch.float32, q.device)
    part_strides = (num_heads * num_splits, num_splits, 1)  # of part_lse; part_out adds a factor HEAD_DIM
    _paged_decode_kernel[(batch_size, num_heads, num_splits)](
        *args, part_out, part_lse, qk_scale, partition_size, *strides, *part_strides, SPLIT=True, **common
    )
    _paged_decode_merge_kernel[(batch_size, num_heads)](
        part_out, part_lse, out, num_splits, *part_strides, out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(num_splits), num_warps=2,
    )
    return out
