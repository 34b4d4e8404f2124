"""Pure-torch references for every fastgpt2 kernel; also the CPU path of the engine.

Sections: sampling, attention (KV-cache write, paged decode, varlen prefill, dense causal), cross-entropy.
Each Triton kernel in this package is tested against the function of the same name here.
"""
from __future__ import annotations

import torch

# ----------------------------------------------------------------------------------------------------------------------
# Sampling
#
# Semantics shared by this reference, the C++ extension (csrc/) and the Triton fused sampler. Per row, on logits that
# are already penalised and divided by the temperature:
#   1. p = softmax(logits) in float64.
#   2. Rank order is (p descending, token id ascending): ties are broken by the smaller token id.
#   3. top-k: keep the first top_k tokens in rank order (top_k <= 0 or top_k >= vocab means no top-k).
#   4. top-p: with S_k the sum of p over the top-k set, keep the token at rank r when the sum of p over the kept tokens
#      ranked before it is < top_p * S_k (rank 0 is always kept; top_p = 1.0 keeps the whole top-k set).
#   5. min-p: keep a token when p >= min_p * p_max (min_p = 0 keeps everything); tokens with p = 0 are never kept.
#   6. Draw with a uniform u in [0, 1): with S the sum of p over the kept set, the sample is the smallest kept token id i
#      such that the running sum of kept p in token-id order up to and including i is > u * S (the last kept id if
#      rounding leaves none).
# ----------------------------------------------------------------------------------------------------------------------


def _check_logits(logits: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (batch, vocab), got shape {tuple(logits.shape)}")
    if torch.isnan(logits).any():
        raise ValueError("logits contain NaN; the model output is corrupt or the penalties produced NaN")


def sampling_mask(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Kept-token mask after top-k, top-p and min-p truncation.

    Parameters
    ----------
    logits : (B, V) float tensor, temperature already applied; -inf marks banned tokens.
    top_k : (B,) int tensor; <= 0 or >= V disables top-k.
    top_p : (B,) float tensor in (0, 1].
    min_p : (B,) float tensor in [0, 1).

    Returns
    -------
    (B, V) bool tensor, True where the token stays a candidate.
    """
    _check_logits(logits)
    num_rows, vocab_size = logits.shape
    probs = torch.softmax(logits.double(), dim=-1)  # (B, V) float64
    # Stable sort on -p after sorting by id keeps ties in ascending token-id order.
    order = torch.argsort(-probs, dim=-1, stable=True)  # (B, V) token ids in rank order
    sorted_probs = torch.gather(probs, 1, order)  # (B, V)
    ranks = torch.arange(vocab_size, device=logits.device).expand(num_rows, vocab_size)
    k = top_k.to(torch.long).clone()
    k[(k <= 0) | (k > vocab_size)] = vocab_size
    keep_sorted = ranks < k[:, None]
    kept_k = torch.where(keep_sorted, sorted_probs, torch.zeros_like(sorted_probs))
    s_k = kept_k.sum(dim=-1, keepdim=True)
    cum_before = torch.cumsum(kept_k, dim=-1) - kept_k
    # top_p = 1 keeps everything exactly: comparing a cumsum with its own total would drop a rounding tail.
    keep_sorted &= (cum_before < top_p.double()[:, None] * s_k) | (top_p[:, None] >= 1.0)
    keep_sorted[:, 0] = True
    keep_sorted &= sorted_probs >= min_p.double()[:, None] * sorted_probs[:, :1]
    keep_sorted &= sorted_probs > 0  # banned (-inf) tokens are never candidates
    mask = torch.zeros_like(keep_sorted)
    mask.scatter_(1, order, keep_sorted)
    return mask


def sample_from_mask(logits: torch.Tensor, mask: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw over the kept tokens in token-id order (step 6 above).

    logits : (B, V) float, mask : (B, V) bool, uniform : (B,) float in [0, 1). Returns (B,) int64 token ids.
    """
    probs = torch.softmax(logits.double(), dim=-1) * mask  # (B, V) float64, zero outside the kept set
    cum = torch.cumsum(probs, dim=-1)  # (B, V)
    target = uniform.double()[:, None] * cum[:, -1:]
    # First kept index whose running sum exceeds the target; masked-out entries never qualify.
    hit = (cum > target) & mask
    last_kept = mask.shape[1] - 1 - torch.argmax(mask.flip(1).to(torch.uint8), dim=1)
    first_hit = torch.argmax(hit.to(torch.uint8), dim=1)
    return torch.where(hit.any(dim=1), first_hit, last_kept)


def topk_topp_minp_sample(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor, uniform: torch.Tensor
) -> torch.Tensor:
    """Truncate (top-k -> top-p -> min-p) then draw one token per row with the given uniforms. Returns (B,) int64."""
    return sample_from_mask(logits, sampling_mask(logits, top_k, top_p, min_p), uniform)


def row_logprobs(logits: torch.Tensor, targets: list[int] | None, top_n: int, rows: list[int] | None = None):
    """Per row of (B, V) logits (or per row listed in `rows`, R of them), log_softmax's value at targets[r] (-1: none
    for that row, NaN) and its top_n tokens.

    Returns (target logprobs: list of R floats, or None when targets is None; top ids: R lists of top_n ints; top
    logprobs: R lists of top_n floats, descending)."""
    logprobs = torch.log_softmax((logits if rows is None else logits[rows]).float(), dim=-1)  # (R, V)
    target_logprobs = None
    if targets is not None:
        index = torch.tensor([max(t, 0) for t in targets], dtype=torch.int64, device=logits.device)
        values = logprobs.gather(1, index[:, None])[:, 0].tolist()  # (R,)
        target_logprobs = [v if t >= 0 else float("nan") for v, t in zip(values, targets)]
    top_values, top_ids = torch.topk(logprobs, top_n, dim=-1)  # (R, top_n) each
    return target_logprobs, top_ids.tolist(), top_values.tolist()


# ----------------------------------------------------------------------------------------------------------------------
# Attention
#
# KV cache of one layer: k_cache, v_cache each (num_blocks, block_size, H, D), contiguous; slot = block_id * block_size
# + offset. Block tables are (B, max_blocks) int32 padded with 0. Cache slots that no sequence owns may hold anything
# (NaN included): every function below masks them out before they can reach a sum.
# ----------------------------------------------------------------------------------------------------------------------

_sdpa = torch.nn.functional.scaled_dot_product_attention


def reshape_and_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write k[i], v[i] into cache slot slot_mapping[i]; slot -1 skips token i.

    k, v : (N, H, D); k_cache, v_cache : (num_blocks, block_size, H, D) contiguous; slot_mapping : (N,) int64.
    """
    num_blocks, block_size, num_heads, head_dim = k_cache.shape
    keep = slot_mapping >= 0  # (N,) bool
    slots = slot_mapping[keep].long()
    k_flat = k_cache.view(num_blocks * block_size, num_heads, head_dim)
    v_flat = v_cache.view(num_blocks * block_size, num_heads, head_dim)
    k_flat.index_copy_(0, slots, k[keep].to(k_cache.dtype))
    v_flat.index_copy_(0, slots, v[keep].to(v_cache.dtype))


def _finish(result: torch.Tensor, out: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if out is None:
        return result.to(dtype)
    out.copy_(result)
    return out


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query per sequence against its first seq_lens[b] cached tokens.

    q : (B, H, D); block_tables : (B, max_blocks) int32; seq_lens : (B,) int32, >= 1.
    Returns (B, H, D) in q's dtype (written into `out` when given). Computed in float32.
    """
    batch_size, num_heads, head_dim = q.shape
    block_size = k_cache.shape[1]
    if batch_size == 1:
        # Batch-1 decode is the latency path on CPU: slice exactly the owned tokens, so no mask and no zeroing.
        context_len = int(seq_lens[0])
        table = block_tables[0, : -(-context_len // block_size)].long()
        keys = k_cache.index_select(0, table).view(-1, num_heads, head_dim)[:context_len].float().transpose(0, 1)
        values = v_cache.index_select(0, table).view(-1, num_heads, head_dim)[:context_len].float().transpose(0, 1)
        result = _sdpa(q.float().transpose(0, 1).unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0), scale=scale)
        return _finish(result[0].transpose(0, 1), out, q.dtype)  # (1, H, D)
    # Only gather the blocks the longest sequence uses (a host sync, free on the CPU path).
    max_blocks = -(-int(seq_lens.max()) // block_size)
    tables = block_tables[:, :max_blocks].long()
    keys = k_cache[tables].reshape(batch_size, max_blocks * block_size, num_heads, head_dim)  # (B, L, H, D)
    values = v_cache[tables].reshape(batch_size, max_blocks * block_size, num_heads, head_dim)
    valid = torch.arange(max_blocks * block_size, device=q.device)[None, :] < seq_lens[:, None]  # (B, L)
    # Unowned slots may hold NaN, and NaN * 0 = NaN inside SDPA, so zero them rather than only masking the scores.
    keys = torch.where(valid[:, :, None, None], keys.float(), 0.0).transpose(1, 2)  # (B, H, L, D)
    values = torch.where(valid[:, :, None, None], values.float(), 0.0).transpose(1, 2)
    result = _sdpa(
        q.float().unsqueeze(2), keys, values, attn_mask=valid[:, None, None, :], scale=scale
    )  # (B, H, 1, D)
    return _finish(result.squeeze(2), out, q.dtype)


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
) -> torch.Tensor:
    """Causal attention of packed new queries over the paged cache (plain, chunked and prefix-cached prefill).

    q : (N, H, D) queries of B sequences packed back to back; cu_seqlens_q : (B+1,) int32; seq_lens : (B,) int32 total
    context (cached prefix + new queries, whose K/V are already in the cache); block_tables : (B, max_blocks) int32.
    Query i of sequence b sits at position seq_lens[b] - q_len_b + i and sees positions <= its own.
    max_seqlen_q is accepted for signature parity with the Triton wrapper and ignored. Returns (N, H, D).
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size = k_cache.shape[1]
    result = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    bounds = cu_seqlens_q.tolist()
    for b, context_len in enumerate(seq_lens.tolist()):
        start, end = bounds[b], bounds[b + 1]
        q_len = end - start
        if q_len == 0:
            continue
        table = block_tables[b, : -(-context_len // block_size)].long()
        keys = k_cache.index_select(0, table).view(-1, num_heads, head_dim)[:context_len].float().transpose(0, 1)
        values = v_cache.index_select(0, table).view(-1, num_heads, head_dim)[:context_len].float().transpose(0, 1)
        if q_len == context_len:  # no cached prefix: plain causal attention; 4-D so that SDPA takes its fused kernel
            seg = _sdpa(q[start:end].float().transpose(0, 1)[None], keys[None], values[None], is_causal=True,
                        scale=scale)[0]
        else:
            q_pos = torch.arange(context_len - q_len, context_len, device=q.device)  # (q_len,)
            mask = torch.arange(context_len, device=q.device)[None, :] <= q_pos[:, None]  # (q_len, L)
            seg = _sdpa(q[start:end].float().transpose(0, 1), keys, values, attn_mask=mask, scale=scale)
        result[start:end] = seg.transpose(0, 1)  # (q_len, H, D)
    return _finish(result, out, q.dtype)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    cu_seqlens: torch.Tensor | None = None,
    *,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Dense attention for training, scaled by 1/sqrt(D); differentiable through autograd.

    Padded: q, k, v (B, H, T, D). Packed: q, k, v (N, H, D) with cu_seqlens (B+1,) int32; attention stays inside each
    sequence. max_seqlen is accepted for signature parity with the Triton wrapper and ignored. Returns q's shape.
    """
    if cu_seqlens is None:
        return _sdpa(q, k, v, is_causal=causal)
    bounds = cu_seqlens.tolist()
    segments = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        seg = [t[start:end].transpose(0, 1) for t in (q, k, v)]  # (H, L, D) each
        segments.append(_sdpa(*seg, is_causal=causal).transpose(0, 1))
    return torch.cat(segments, dim=0)  # (N, H, D)



# ----------------------------------------------------------------------------------------------------------------------
# Cross-entropy
# ----------------------------------------------------------------------------------------------------------------------


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, reduction: str = "mean",
    chunk_rows: int = 4096,
) -> torch.Tensor:
    """torch.nn.functional.cross_entropy on float32-upcast logits, in row chunks to bound the forward's peak memory.

    logits : (N, V) float; targets : (N,) int64, rows equal to `ignore_index` add 0 loss and get 0 gradient.
    reduction : "mean" over non-ignored rows, "sum" or "none". Returns float32: a scalar, or (N,) for "none".
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    losses = torch.cat([
        torch.nn.functional.cross_entropy(
            logits[start:start + chunk_rows].float(), targets[start:start + chunk_rows],
            ignore_index=ignore_index, reduction="none",
        )
        for start in range(0, logits.shape[0], chunk_rows)
    ])  # (N,) float32, 0 on ignored rows
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (targets != ignore_index).sum()
