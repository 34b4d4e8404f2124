"""Gumbel-softmax differentiable decoding (Texar's GumbelSoftmaxEmbeddingHelper) for training-time objectives:
every step feeds the expected embedding of a relaxed one-hot sample back into the model, over a dense KV cache."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastgpt2.model.gpt2 import GPT2


@dataclass(slots=True)
class GumbelSoftmaxOutput:
    """What gumbel_softmax_decode returns; step i was drawn from logits[:, i] (step 0 from the context's last
    position)."""

    sample_ids: torch.Tensor  # (B, N) int64: argmax(logits + Gumbel noise), an exact sample of softmax(logits)
    soft_samples: torch.Tensor  # (B, N, V) what was fed back: y, or in straight-through mode one_hot(ids) with y's grad
    logits: torch.Tensor  # (B, N, V) in the model's dtype, with autograd


def gumbel_softmax_decode(model: GPT2, context_ids, max_tokens: int, tau: float = 1.0, straight_through: bool = False,
                          generator: torch.Generator | None = None) -> GumbelSoftmaxOutput:
    """Decode max_tokens steps after context_ids, differentiably.

    model : a GPT2 (its mode decides dropout; nothing is detached, so gradients reach every parameter).
    context_ids : (B, T) integer tensor, or a list of B equal-length lists of token ids; T >= 1 and T + max_tokens at
        most n_positions.
    tau : the softmax temperature, > 0. straight_through : feed one_hot(sample_ids) forward, y's gradient backward.
    generator : a torch.Generator on the model's device for the Gumbel noise (None: torch's default generator).

    Steps, for i = 0 .. N - 1:
      1. logits_i (B, V): the context's last position for i = 0, else the position fed in step i - 1;
      2. g = -log(-log(U)), U ~ Uniform(0, 1) clamped away from 0 and 1, (B, V), drawn from `generator`;
      3. y = softmax((logits_i + g) / tau) and sample_ids[:, i] = argmax(logits_i + g);
      4. fed = y, or one_hot(sample_ids[:, i]) + (y - y.detach()) in straight-through mode (exactly one-hot forward);
      5. unless i is the last step, the model runs one position on fed @ wte (+ wpe), extending the KV cache.
    Noise and softmax are computed in float32, or float64 for a float64 model.
    Returns GumbelSoftmaxOutput(sample_ids (B, N) int64, soft_samples (B, N, V), logits (B, N, V)).
    """
    ids = _check_args(model, context_ids, max_tokens, tau, generator)
    B, T = ids.shape
    V = model.config.vocab_size
    wte = model.wte.weight  # (V, C)
    compute_dtype = torch.promote_types(wte.dtype, torch.float32)
    finfo = torch.finfo(compute_dtype)
    logits, kv_cache = model.forward_cached(model.wte(ids))  # (B, T, V)
    step_logits = logits[:, -1]  # (B, V)
    all_ids, all_soft, all_logits = [], [], []
    for i in range(max_tokens):
        u = torch.rand((B, V), generator=generator, device=wte.device, dtype=compute_dtype)
        gumbel = -torch.log(-torch.log(u.clamp_(finfo.tiny, 1.0 - finfo.eps)))  # (B, V), finite
        z = step_logits.to(compute_dtype) + gumbel  # (B, V)
        y = torch.softmax(z / tau, dim=-1)  # (B, V)
        # argmax of z, not of y: y's rounding may tie two tokens that z still tells apart.
        sample = z.argmax(dim=-1)  # (B,)
        # y - y.detach() is exactly zero forward, so the straight-through input is exactly one-hot.
        fed = F.one_hot(sample, V).to(compute_dtype) + (y - y.detach()) if straight_through else y  # (B, V)
        all_ids.append(sample)
        all_soft.append(fed)
        all_logits.append(step_logits)
        if i + 1 < max_tokens:
            embeds = fed.to(wte.dtype) @ wte  # (B, C), the expected token embedding
            logits, kv_cache = model.forward_cached(embeds[:, None, :], kv_cache)  # (B, 1, V)
            step_logits = logits[:, 0]
    return GumbelSoftmaxOutput(sample_ids=torch.stack(all_ids, dim=1), soft_samples=torch.stack(all_soft, dim=1),
                               logits=torch.stack(all_logits, dim=1))


def _check_args(model, context_ids, max_tokens, tau, generator) -> torch.Tensor:
    """Every argument a caller can get wrong; returns context_ids as a (B, T) int64 tensor on the model's device."""
    if not isinstance(model, GPT2):
        raise ValueError(f"model must be a fastgpt2 GPT2, got {type(model).__name__}; load one with "
                         "GPT2.from_pretrained")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (0.0 < tau < math.inf):
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
    device = model.wte.weight.device
    if generator is not None and (not isinstance(generator, torch.Generator) or generator.device.type != device.type):
        raise ValueError(f"generator must be a torch.Generator on the model's device ({device}), got {generator!r}")
    if not isinstance(context_ids, torch.Tensor):
        try:
            context_ids = torch.as_tensor(context_ids)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError("context_ids must be a (batch, seq) tensor or a list of equal-length lists of token "
                             "ids") from None
    if context_ids.dim() != 2:
        raise ValueError(f"context_ids must have shape (batch, seq), got shape {tuple(context_ids.shape)}")
    if context_ids.is_floating_point() or context_ids.is_complex() or context_ids.dtype == torch.bool:
        raise ValueError(f"context_ids must hold integer token ids, got dtype {context_ids.dtype}")
    B, T = context_ids.shape
    if B == 0 or T == 0:
        raise ValueError(f"context_ids of shape {(B, T)} is empty; start from the <|endoftext|> id to decode "
                         "unconditionally")
    n_positions = model.config.n_positions
    if T + max_tokens > n_positions:
        raise ValueError(f"{T} context + {max_tokens} new tokens exceed the model's context of {n_positions} tokens; "
                         "shorten the context or lower max_tokens")
    lo, hi = int(context_ids.min()), int(context_ids.max())
    if lo < 0 or hi >= model.config.vocab_size:
        raise ValueError(f"token id {lo if lo < 0 else hi} in context_ids is out of range for a vocabulary of "
                         f"{model.config.vocab_size}")
    return context_ids.to(device, torch.long)
