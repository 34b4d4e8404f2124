"""AdamW as nanoGPT configures it (weight decay on matrices and embeddings only) and its learning-rate schedule:
linear warmup, then cosine decay to min_lr at the last step. The schedule is a pure function of the step, so the
step counter is the scheduler's whole state."""
from __future__ import annotations

import math

import torch

from fastgpt2.train.config import TrainConfig


def build_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the (sharded) parameters: 2-D and larger tensors decay, biases and LayerNorm weights do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # foreach kernels on every device; fused AdamW is left out because its DTensor support varies across releases.
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=1e-8, foreach=True)


def lr_at(step: int, config: TrainConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`: (step + 1) / (warmup + 1) of the peak
    during warmup (nanoGPT's ramp), then a cosine from lr down to min_lr (lr / 10 unless set)."""
    warmup = config.warmup_for(total_steps)
    min_lr = config.lr / 10 if config.min_lr is None else config.min_lr
    if step < warmup:
        return config.lr * (step + 1) / (warmup + 1)
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
