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
#   5. min-p: keep a token when p >= min_p * p_max (min_p = 0 keeps everything).
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
    keep_sorted &= cum_before < top_p.double()[:, None] * s_k
    keep_sorted[:, 0] = True
    keep_sorted &= sorted_probs >= min_p.double()[:, None] * sorted_probs[:, :1]
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


# ----------------------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------------------


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
