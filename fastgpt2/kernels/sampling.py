"""Fused top-k -> top-p -> min-p sampling in Triton without sorting the vocabulary.

Semantics are those of `reference.topk_topp_minp_sample` (rank order p desc then id asc, inverse-CDF draw in id order).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _order_key(x):
    """int32 whose signed order is the float order of `x` (-0.0 folded into +0.0 so the two tie, as their p do)."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _row_uniform(seeds_ptr, offsets_ptr, rows, row_ok):
    """Philox uniforms in [0, 1), one per row; shared with `seeded_uniform` so both produce the same noise."""
    seeds = tl.load(seeds_ptr + rows, mask=row_ok, other=0)
    offsets = tl.load(offsets_ptr + rows, mask=row_ok, other=0)
    return tl.rand(seeds, offsets)


@triton.jit
def _load_chunk(row_ptrs, row_ok, start, vocab_size, BLOCK: tl.constexpr):
    """Token ids (1, BLOCK), validity, float32 logits and order keys (ROWS, BLOCK) of one chunk of every row."""
    idx = start + tl.arange(0, BLOCK)[None, :]
    valid = row_ok[:, None] & (idx < vocab_size)
    x = tl.load(row_ptrs + idx, mask=valid, other=float("-inf")).to(tl.float32)
    return idx, valid, x, _order_key(x)


@triton.jit
def _in_cut(key, idx, cut_key, cut_id):
    """Tokens ranked at or before the token (cut_key, cut_id): key > T, or key == T and id <= J."""
    return (key > cut_key[:, None]) | ((key == cut_key[:, None]) & (idx <= cut_id[:, None]))


@triton.jit(do_not_specialize=["num_rows", "vocab_size"])
def _topk_topp_minp_sample_kernel(
    logits_ptr, top_k_ptr, top_p_ptr, min_p_ptr, uniform_ptr, seeds_ptr, offsets_ptr, out_ptr,
    num_rows, vocab_size, stride_row,
    SEEDED: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    # ROWS rows per program (1 for GPT-2's vocab). Each pass re-reads the rows, ROWS * V elements (L2-resident after
    # the first); at most 2 + 2 * 33 + 2 passes, writes ROWS int64. Per-row state is a (ROWS,) vector; the bisection
    # loops run until every row of the program has converged. Keys are the logits' order-preserving int32 bit
    # patterns, so the rank order by p (exact in the float64 reference) is exact here too.
    INT_MAX: tl.constexpr = 2147483647
    INT_MIN: tl.constexpr = -2147483648
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < num_rows
    row_ptrs = logits_ptr + rows.to(tl.int64)[:, None] * stride_row  # (ROWS, 1)
    top_k = tl.load(top_k_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    top_p = tl.load(top_p_ptr + rows, mask=row_ok, other=1.0).to(tl.float32)
    min_p = tl.load(min_p_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    if SEEDED:
        u = _row_uniform(seeds_ptr, offsets_ptr, rows, row_ok)
    else:
        u = tl.load(uniform_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)

    # 1. Row max (q = exp(x - max) is p up to the softmax denominator, which every test below cancels) and key range.
    x_max = tl.full((ROWS,), float("-inf"), tl.float32)
    key_min = tl.full((ROWS,), INT_MAX, tl.int32)
    for start in range(0, vocab_size, BLOCK):
        idx, valid, x, key = _load_chunk(row_ptrs, row_ok, start, vocab_size, BLOCK)
        x_max = tl.maximum(x_max, tl.max(x, axis=1))
        key_min = tl.minimum(key_min, tl.min(tl.where(valid, key, INT_MAX), axis=1))
    key_max = _order_key(x_max)
    x_max = tl.where(x_max > float("-inf"), x_max, 0.0)  # rows without a finite logit: q = 0 rather than NaN

    # 2. top-k: bisect on keys for T = the k-th largest key, keeping count(key >= lo) >= k > count(key >= hi). Each
    #    pass also snaps lo/hi to the nearest keys present, so it ends after min(32, distinct keys) passes. The tie
    #    pass then keeps the first k - count(key > T) tokens with key T in id order. A disabled row starts converged.
    k_on = row_ok & (top_k > 0) & (top_k < vocab_size)
    lo = tl.where(k_on, key_min.to(tl.int64), 0)
    hi = tl.where(k_on, key_max.to(tl.int64) + 1, 1)
    count_hi = tl.zeros((ROWS,), tl.int32)
    while tl.max(hi - lo, axis=0) > 1:
        mid = (lo + (hi - lo) // 2).to(tl.int32)
        count = tl.zeros((ROWS,), tl.int32)
        key_above = tl.full((ROWS,), INT_MAX, tl.int32)
        key_below = tl.full((ROWS,), INT_MIN, tl.int32)
        for start in range(0, vocab_size, BLOCK):
            idx, valid, x, key = _load_chunk(row_ptrs, row_ok, start, vocab_size, BLOCK)
            at_least = valid & (key >= mid[:, None])
            count += tl.sum(at_least.to(tl.int32), axis=1)
            key_above = tl.minimum(key_above, tl.min(tl.where(at_least, key, INT_MAX), axis=1))
            key_below = tl.maximum(key_below, tl.max(tl.where(valid & (key < mid[:, None]), key, INT_MIN), axis=1))
        active = hi - lo > 1
        enough = count.to(tl.int64) >= top_k
        new_lo = tl.where(enough, tl.minimum(key_above.to(tl.int64), hi - 1), lo)
        new_hi = tl.where(enough, hi, tl.maximum(key_below.to(tl.int64) + 1, lo + 1))
        count_hi = tl.where(active & ~enough, count, count_hi)
        lo = tl.where(active, new_lo, lo)
        hi = tl.where(active, new_hi, hi)
    cut_key = tl.where(k_on, lo.to(tl.int32), key_min)
    cut_id = tl.full((ROWS,), -1, tl.int32)
    if tl.sum(k_on.to(tl.int32), axis=0) > 0:
        num_ties_kept = (top_k - count_hi).to(tl.int32)
        seen = tl.zeros((ROWS,), tl.int32)
        for start in range(0, vocab_size, BLOCK):
            idx, valid, x, key = _load_chunk(row_ptrs, row_ok, start, vocab_size, BLOCK)
            tie = (valid & (key == cut_key[:, None])).to(tl.int32)
            tie_rank = seen[:, None] + tl.cumsum(tie, axis=1)
            hit = (tie > 0) & (tie_rank == num_ties_kept[:, None])
            cut_id = tl.maximum(cut_id, tl.max(tl.where(hit, idx, -1), axis=1))
            seen += tl.sum(tie, axis=1)
    cut_id = tl.where(k_on, cut_id, vocab_size - 1)

    # 3. top-p inside the top-k set: bisect on keys for the smallest T with mass(key > T) < top_p * S_k (snapping
    #    as above: mass(key > t) is flat between neighbouring keys); the tie pass keeps tokens with key T while the
    #    mass ranked before them stays < top_p * S_k. Rank 0 is always kept.
    p_on = row_ok & (top_p < 1.0)
    if tl.sum(p_on.to(tl.int32), axis=0) > 0:
        mass_k = tl.zeros((ROWS,), tl.float32)
        for start in range(0, vocab_size, BLOCK):
            idx, valid, x, key = _load_chunk(row_ptrs, row_ok, start, vocab_size, BLOCK)
            in_k = valid & _in_cut(key, idx, cut_key, cut_id)
            mass_k += tl.sum(tl.where(in_k, tl.exp(x - x_max[:, None]), 0.0), axis=1)
        mass_p = top_p * mass_k
        lo = tl.where(p_on, cut_key.to(tl.int64) - 1, 0)
        hi = tl.where(p_on, key_max.to(tl.int64), 1)
        mass_hi = tl.zeros((ROWS,), tl.float32)
        while tl.max(hi - lo, axis=0) > 1:
            mid = (lo + (hi - lo) // 2).to(tl.int32)
            mass = tl.zeros((ROWS,), tl.float32)
            key_above = tl.full((ROWS,), INT_MAX, tl.int32)
            key_below = tl.full((ROWS,), INT_MIN, tl.int32)
            for start in range(0, vocab_size, BLOCK):
                idx, valid, x, key = _load_chunk(row_ptrs, row_ok, start, vocab_size, BLOCK)
                in_k = valid & _in_cut(key, idx, cut_key, cut_id)
                above = in_k & (key > mid[:, None])
                mass += tl.sum(tl.where(above, tl.exp(x - x_max[:, None]), 0.0), axis=1)
                key_above = tl.minimum(key_above, tl.min(tl.where(above, key, INT_MAX), axis=1))
                key_below = tl.maximum(key_below, tl.max(tl.where(in_k & ~above, key, INT_MIN), axis=1))
            active = hi - lo > 1
            below = mass < mass_p
            new_hi = tl.where(below, tl.maximum(key_below.to(tl.int64), lo + 1), hi)
            new_lo = tl.where(below, lo, tl.minimum(key_above.to(tl.int64) - 1, hi - 1))
            mass_hi = tl.where(active & below, mass, mass_hi)
            lo = tl.where(active, new_lo, lo)
            hi = tl.where(active, new_hi, hi)
        p_key = hi.to(tl.int32)
        mass_seen = mass_hi
        p_id = tl.full((ROWS,), -1, tl.int32)
        first_tie = tl.full((ROWS,), INT_MAX, tl.int32)
        for start in range(0, vocab_size, BLOCK):
            idx, valid, x, key = _load_chunk(row_ptrs, row_ok, start, vocab_size, BLOCK)
            tie = valid & _in_cut(key, idx, cut_key, cut_id) & (key == p_key[:, None])
            tie_q = tl.where(tie, tl.exp(x - x_max[:, None]), 0.0)
            before = mass_seen[:, None] + (tl.cumsum(tie_q, axis=1) - tie_q)
            p_id = tl.maximum(p_id, tl.max(tl.where(tie & (before < mass_p[:, None]), idx, -1), axis=1))
            first_tie = tl.minimum(first_tie, tl.min(tl.where(tie, idx, INT_MAX), axis=1))
            mass_seen += tl.sum(tie_q, axis=1)
        cut_key = tl.where(p_on, p_key, cut_key)
        cut_id = tl.where(p_on, tl.maximum(p_id, first_tie), cut_id)

    # 4. min-p (q >= min_p, since q_max = 1) and the kept mass S; -inf logits are never kept.
    mass_kept = tl.zeros((ROWS,), tl.float32)
    for start in range(0, vocab_size, BLOCK):
        idx, valid, x, key = _load_chunk(row_ptrs, row_ok, start, vocab_size, BLOCK)
        q = tl.exp(x - x_max[:, None])
        kept = valid & (x > float("-inf")) & (q >= min_p[:, None]) & _in_cut(key, idx, cut_key, cut_id)
        mass_kept += tl.sum(tl.where(kept, q, 0.0), axis=1)

    # 5. Inverse CDF in id order: the first kept id whose running mass exceeds u * S, else the last kept id with q > 0.
    target = u * mass_kept
    running = tl.zeros((ROWS,), tl.float32)
    first_hit = tl.full((ROWS,), INT_MAX, tl.int32)
    last_kept = tl.full((ROWS,), -1, tl.int32)
    for start in range(0, vocab_size, BLOCK):
        idx, valid, x, key = _load_chunk(row_ptrs, row_ok, start, vocab_size, BLOCK)
        q = tl.exp(x - x_max[:, None])
        kept = valid & (x > float("-inf")) & (q >= min_p[:, None]) & _in_cut(key, idx, cut_key, cut_id)
        q_kept = tl.where(kept, q, 0.0)
        hit = kept & (running[:, None] + tl.cumsum(q_kept, axis=1) > target[:, None])
        first_hit = tl.minimum(first_hit, tl.min(tl.where(hit, idx, INT_MAX), axis=1))
        last_kept = tl.maximum(last_kept, tl.max(tl.where(q_kept > 0.0, idx, -1), axis=1))
        running += tl.sum(q_kept, axis=1)
    sample = tl.where(first_hit < INT_MAX, first_hit, last_kept)
    tl.store(out_ptr + rows, sample.to(tl.int64), mask=row_ok)


@triton.jit(do_not_specialize=["num_rows"])
def _seeded_uniform_kernel(seeds_ptr, offsets_ptr, out_ptr, num_rows, ROWS: tl.constexpr):
    # read 2 int64, write 1 float32 per row
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < num_rows
    tl.store(out_ptr + rows, _row_uniform(seeds_ptr, offsets_ptr, rows, row_ok), mask=row_ok)


def _check_row_param(name: str, t: torch.Tensor, num_rows: int, device: torch.device, integer: bool) -> torch.Tensor:
    if t.shape != (num_rows,):
        raise ValueError(f"{name} must have shape ({num_rows},) to match logits, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but logits are on {device}; move them to the same device")
    if integer == t.dtype.is_floating_point:
        kind = "an integer" if integer else "a floating-point"
        raise ValueError(f"{name} must be {kind} tensor, got {t.dtype}")
    return t.contiguous()


def _launch(logits, top_k, top_p, min_p, uniform, seeds, offsets, out):
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be 2-D (batch, vocab) with vocab > 0, got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    if logits.stride(1) != 1:
        raise ValueError("logits must be contiguous along the vocab dimension; call .contiguous() first")
    num_rows, vocab_size = logits.shape
    device = logits.device
    top_k = _check_row_param("top_k", top_k, num_rows, device, integer=True)
    top_p = _check_row_param("top_p", top_p, num_rows, device, integer=False)
    min_p = _check_row_param("min_p", min_p, num_rows, device, integer=False)
    seeded = uniform is None
    if seeded:
        seeds = _check_row_param("seeds", seeds, num_rows, device, integer=True)
        offsets = _check_row_param("offsets", offsets, num_rows, device, integer=True)
        uniform = top_p  # unused pointer
    else:
        uniform = _check_row_param("uniform", uniform, num_rows, device, integer=False)
        seeds = offsets = top_k  # unused pointers
    if out is None:
        out = torch.empty(num_rows, dtype=torch.int64, device=device)
    elif out.shape != (num_rows,) or out.dtype != torch.int64 or out.device != device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous ({num_rows},) int64 tensor on {device}")
    if num_rows == 0:
        return out
    # A tile of ROWS x BLOCK <= 4096 floats on GPU (one row per program for GPT-2's 50257); Triton's CPU interpreter
    # pays per op, not per element, so it takes tiles of up to 64K elements.
    tile = 4096 if device.type == "cuda" else 65536
    block = min(tile, triton.next_power_of_2(vocab_size))
    rows_per_program = min(triton.next_power_of_2(num_rows), max(1, tile // block))
    _topk_topp_minp_sample_kernel[(triton.cdiv(num_rows, rows_per_program),)](
        logits, top_k, top_p, min_p, uniform, seeds, offsets, out,
        num_rows, vocab_size, logits.stride(0),
        SEEDED=seeded, ROWS=rows_per_program, BLOCK=block, num_warps=8 if rows_per_program * block >= 2048 else 4,
    )
    return out


def topk_topp_minp_sample(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor, uniform: torch.Tensor,
    *, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Truncate (top-k -> top-p -> min-p) then draw one token per row with the given uniforms.

    Parameters
    ----------
    logits : (B, V) float32/float16/bfloat16, temperature applied, unit stride along V; -inf marks banned tokens.
    top_k : (B,) integer; <= 0 or >= V disables top-k.
    top_p : (B,) float in (0, 1]; 1.0 disables top-p.
    min_p : (B,) float in [0, 1]; 0 disables min-p.
    uniform : (B,) float in [0, 1).
    out : optional (B,) int64 buffer for the result.

    Returns
    -------
    (B,) int64 token ids. Rows without a finite logit (or with NaN) are unsupported and yield -1 or garbage.
    """
    return _launch(logits, top_k, top_p, min_p, uniform, None, None, out)


def topk_topp_minp_sample_seeded(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
    seeds: torch.Tensor, offsets: torch.Tensor, *, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """As `topk_topp_minp_sample`, with the uniform drawn in the kernel as `seeded_uniform(seeds, offsets)`.

    seeds, offsets : (B,) int64; a row's draw depends only on its own (seed, offset), not on its batch position.
    """
    return _launch(logits, top_k, top_p, min_p, None, seeds, offsets, out)


def seeded_uniform(seeds: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(B,) float32 Philox uniforms in [0, 1): exactly the noise `topk_topp_minp_sample_seeded` draws per row."""
    if seeds.dim() != 1:
        raise ValueError(f"seeds must be 1-D, got shape {tuple(seeds.shape)}")
    seeds = _check_row_param("seeds", seeds, seeds.shape[0], seeds.device, integer=True)
    offsets = _check_row_param("offsets", offsets, seeds.shape[0], seeds.device, integer=True)
    out = torch.empty(seeds.shape[0], dtype=torch.float32, device=seeds.device)
    if seeds.shape[0] > 0:
        rows_per_program = min(1024, triton.next_power_of_2(seeds.shape[0]))
        _seeded_uniform_kernel[(triton.cdiv(seeds.shape[0], rows_per_program),)](
            seeds, offsets, out, seeds.shape[0], ROWS=rows_per_program)
    return out
