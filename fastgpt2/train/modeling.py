"""The model as the trainer runs it: dropout set for fine-tuning, the project's Triton flash attention (forward and
backward) in every block on CUDA, and the summed token cross-entropy through the fused Triton kernel on CUDA."""
from __future__ import annotations

import torch
import torch.nn as nn

from fastgpt2.kernels import dispatch
from fastgpt2.model.gpt2 import GPT2, CausalSelfAttention
from fastgpt2.train.packing import IGNORE_INDEX


class FlashCausalSelfAttention(CausalSelfAttention):
    """CausalSelfAttention with the attention itself in kernels/flash_attention.py (Triton forward and backward).
    Same parameters and names; a module's class is switched in place by use_flash_attention, so checkpoints and
    state dicts are unchanged. The kernel has no dropout: it is used only where attn_pdrop is 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hs)
        y = dispatch.get("flash_attention", x.device)(q, k, v, causal=True)  # (B, nh, T, hs), last dim contiguous
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


def set_dropout(model: GPT2, p: float) -> None:
    """Every dropout of the model (embeddings, attention probabilities, residual branches) to p, and the config that
    an export writes with it."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        elif isinstance(module, CausalSelfAttention):
            module.attn_pdrop = p
    model.config = model.config.replace(embd_pdrop=p, attn_pdrop=p, resid_pdrop=p)


def use_flash_attention(model: GPT2, device: torch.device) -> bool:
    """Switch every attention module to FlashCausalSelfAttention when dispatch picks Triton on `device` (CUDA) and
    the model trains without attention dropout. Returns whether it did."""
    if not dispatch.use_triton(device) or model.config.attn_pdrop > 0:
        return False
    for module in model.modules():
        if type(module) is CausalSelfAttention:
            module.__class__ = FlashCausalSelfAttention
    return True


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over target positions and their number.

    logits : (B, T, V) any float dtype; targets : (B, T) int64, IGNORE_INDEX where a position has no target.
    Returns (float32 0-d sum, int64 0-d count). The fused Triton kernel on CUDA, the torch reference on CPU."""
    V = logits.shape[-1]
    flat = targets.reshape(-1).to(logits.device)
    loss = dispatch.get("cross_entropy", logits.device)(logits.reshape(-1, V), flat, IGNORE_INDEX, "sum")
    return loss, (flat != IGNORE_INDEX).sum()


@torch.no_grad()
def greedy_sample(model: GPT2, tokenizer, prompt: str, num_tokens: int) -> str:
    """Greedy continuation of `prompt` with the dense forward (no KV cache: a few dozen tokens at evaluation time);
    stops at <|endoftext|>. The serving engine does this faster (the CLI uses it)."""
    ids = tokenizer.encode(prompt) or [tokenizer.eos_token_id]
    new: list[int] = []
    for _ in range(num_tokens):
        context = torch.tensor([(ids + new)[-model.config.n_positions:]])  # (1, T)
        token = int(model(input_ids=context).logits[0, -1].argmax())
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
    return tokenizer.decode(new)
