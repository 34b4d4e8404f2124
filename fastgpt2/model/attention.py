"""The attention seam: dense causal attention (the module's forward: training and reference) and paged attention
over the KV cache (forward_paged: writes the new K/V into the block pool and attends through block tables, kernels
picked by fastgpt2.kernels.dispatch: Triton on CUDA, C++ or torch on CPU). Training-time decoding (forward_cached)
attends over a dense, autograd-friendly KV cache instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastgpt2.kernels import dispatch


@dataclass(slots=True)
class AttentionMetadata:
    """Per-step description of a packed batch: decode tokens first (one per sequence), then prefill chunks."""

    slot_mapping: torch.Tensor  # (N,) int64 cache slot of every token (block_id * block_size + offset)
    num_decode_tokens: int  # the first num_decode_tokens tokens are single-token decodes
    decode_block_tables: torch.Tensor  # (num_decodes, max_blocks) int32
    decode_seq_lens: torch.Tensor  # (num_decodes,) int32, context length including the new token
    prefill_cu_seqlens_q: torch.Tensor  # (num_prefills + 1,) int32 cumulative query counts of the prefill chunks
    prefill_seq_lens: torch.Tensor  # (num_prefills,) int32, cached prefix + chunk length
    prefill_block_tables: torch.Tensor  # (num_prefills, max_blocks) int32
    num_prefills: int
    prefill_max_query_len: int  # longest prefill chunk (saves the Triton wrapper a host sync)
    scale: float  # 1 / sqrt(head_dim)


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           dropout_p: float = 0.0) -> torch.Tensor:
    """q, k, v: (B, nh, T, hs) -> (B, nh, T, hs); scaled by 1/sqrt(hs). dropout_p: dropout on the attention
    probabilities (the caller passes 0 outside training)."""
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=q.shape[2] > 1)


def dense_cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention of the newest positions over a dense KV cache (autograd flows through the cache).

    q: (B, nh, T, hs), the last T positions; k, v: (B, nh, t, hs), every position so far (t >= T). Query i sits at
    position t - T + i and attends to keys 0 .. t - T + i. Returns (B, nh, T, hs)."""
    T, t = q.shape[2], k.shape[2]
    if T == 1 or T == t:  # one new query sees the whole cache; no cache is the plain causal case
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T > 1)
    mask = torch.ones(T, t, dtype=torch.bool, device=q.device).tril(diagonal=t - T)  # (T, t), True = attend
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata
) -> torch.Tensor:
    """q, k, v: (N, nh, hs) packed tokens; kv_cache: (k_cache, v_cache) each (num_blocks, block_size, nh, hs).

    Writes k, v into the cache at meta.slot_mapping, then attends. Returns (N, nh, hs).
    """
    k_cache, v_cache = kv_cache
    device = q.device
    dispatch.get("reshape_and_cache", device)(k, v, k_cache, v_cache, meta.slot_mapping)
    nd = meta.num_decode_tokens
    decode = dispatch.get("paged_decode_attention", device)
    if meta.num_prefills == 0:
        return decode(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_seq_lens, meta.scale)
    prefill_out = dispatch.get("prefill_attention", device)(
        q[nd:], k_cache, v_cache, meta.prefill_cu_seqlens_q, meta.prefill_seq_lens, meta.prefill_block_tables, meta.scale,
        max_seqlen_q=meta.prefill_max_query_len,
    )
    if nd == 0:
        return prefill_out
    decode_out = decode(q[:nd], k_cache, v_cache, meta.decode_block_tables, meta.decode_seq_lens, meta.scale)
    return torch.cat([decode_out, prefill_out], dim=0)
