"""GPT-2 exactly as published, with checkpoint parameter names: the dense forward (training, evaluation, the
reference for every other path) in plain torch ops, and forward_paged, the engine's packed step (model/inference.py)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastgpt2.model import checkpoint, inference, quantize
from fastgpt2.model.attention import AttentionMetadata, dense_cached_attention, dense_causal_attention
from fastgpt2.model.config import GPT2Config

IGNORE_INDEX = -100  # labels equal to this take no part in the loss (as in transformers and F.cross_entropy)


@dataclass(slots=True)
class GPT2Output:
    """What `model(...)` returns, like transformers' CausalLMOutput: `out.logits`, `out.loss`; `out[0]` is the loss
    when there is one, else the logits."""

    logits: torch.Tensor  # (B, T, V) in the model's dtype
    loss: torch.Tensor | None = None  # () float32, only when labels were given

    def to_tuple(self) -> tuple:
        return tuple(t for t in (self.loss, self.logits) if t is not None)

    def __getitem__(self, index):
        return self.to_tuple()[index]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' causal LM loss: logits (B, T, V), labels (B, T) int64. Position t predicts labels[:, t + 1];
    labels equal to -100 are ignored; the mean over the others, computed in float32. Returns a 0-d tensor."""
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # (B, T), the last position predicts nothing
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=IGNORE_INDEX)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        # Stored as nn.Linear (out, in): the checkpoint's Conv1D (in, out) weights are transposed once at load time,
        # so every decode-step GEMV reads rows contiguously.
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_pdrop = config.attn_pdrop  # applied inside scaled_dot_product_attention, in train mode only
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hs)
        y = dense_causal_attention(q, k, v, dropout_p=self.attn_pdrop if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def forward_cached(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None):
        """x: (B, T, C), the newest T positions; kv: this layer's (k, v) of the earlier positions, each (B, nh, t, hs),
        or None. Returns (B, T, C) and the new (k, v) of all t + T positions (concatenated: autograd flows through)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hs)
        if kv is not None:
            k, v = torch.cat([kv[0], k], dim=2), torch.cat([kv[1], v], dim=2)  # (B, nh, t + T, hs)
        y = dense_cached_attention(q, k, v, dropout_p=self.attn_pdrop if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C)."""
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def forward_cached(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None):
        a, kv = self.attn.forward_cached(self.ln_1(x), kv)
        x = x + a
        return x + self.mlp(self.ln_2(x)), kv


class GPT2(nn.Module):
    """GPT-2 language model; the output head is tied to `wte`.

    `model(input_ids)` or `model(inputs_embeds=...)`, optionally with `labels`, returns a GPT2Output (logits and
    loss) on the dense causal path, with dropout in train mode as transformers' GPT2LMHeadModel applies it.
    The engine calls `model.forward_paged(input_ids, positions, meta, kv_caches, logits_indices)` with packed (N,)
    tokens over the paged KV cache. Training-time decoding (fastgpt2.model.gumbel) continues the dense forward over a
    dense, autograd-friendly KV cache: `model.forward_cached(inputs_embeds, kv_cache)`.
    """

    def __init__(self, config: GPT2Config):
        super().__init__()
        if not isinstance(config, GPT2Config):
            raise TypeError(f"GPT2 expects a GPT2Config, got {type(config).__name__}; use GPT2.from_pretrained for names")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.drop = nn.Dropout(config.embd_pdrop)
        # How the C++ CPU step stores the weight matrices: None (float32), torch.bfloat16 (set by
        # round_weights_to_bfloat16) or "int8" (set by quantize_weights_int8: q8 blocks with float32 scales, the
        # activations quantised too).
        self.decode_weight_dtype: torch.dtype | str | None = None
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """GPT-2's init: N(0, 0.02) weights, zero biases, residual projections scaled by 1/sqrt(2 * n_layer)."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif ".ln_" in name or name.startswith("ln_"):
                p.fill_(1.0)
            elif name.endswith("c_proj.weight"):
                p.normal_(0.0, 0.02 / math.sqrt(2 * self.config.n_layer))
            elif name == "wpe.weight":
                p.normal_(0.0, 0.01)
            else:
                p.normal_(0.0, 0.02)

    def round_weights_to_bfloat16(self) -> "GPT2":
        """bfloat16 weights with float32 arithmetic (CPUs without native bf16): every float32 parameter is rounded to
        the nearest bfloat16 in place, so that the torch path and the C++ step (which keeps bf16 copies of the
        weight matrices, half the bytes per token) compute the same function."""
        return inference.round_weights_to_bfloat16(self)

    def quantize_weights_int8(self) -> "GPT2":
        """int8 (llama.cpp's q8_0 blocks of 32 inputs, float32 scales): every linear weight matrix and the tied wte
        replaced in place by its dequantised values, the inputs of those matrices quantised the same way on every
        forward, decode_weight_dtype = "int8", so that the torch path and the C++ int8 kernels compute the same
        function. See fastgpt2.model.quantize."""
        return quantize.quantize_weights_int8(self)

    @classmethod
    def from_pretrained(cls, name_or_path, device=None, dtype=None) -> "GPT2":
        """Official weights by preset/hub name, a local Hugging Face directory, or random weights from a GPT2Config.

        The model comes in eval mode with trainable parameters (requires_grad=True), as from transformers; call
        .train() to fine-tune it, or .requires_grad_(False) to freeze it."""
        return checkpoint.load_model(cls, name_or_path, device=device, dtype=dtype)

    def save_pretrained(self, directory, tokenizer=None) -> None:
        """Write config.json, model.safetensors, vocab.json and merges.txt (Hugging Face GPT-2 format)."""
        checkpoint.save_pretrained(self, directory, tokenizer)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids=None, *, inputs_embeds=None, labels=None) -> GPT2Output:
        """The dense causal forward, in plain torch ops (training, evaluation, the reference).

        input_ids : (B, T) integer token ids, or inputs_embeds : (B, T, n_embd) float token embeddings (exactly one;
        the position embeddings are added to either). labels : (B, T) integer or None; position t predicts
        labels[:, t + 1] and -100 is ignored (pass labels = input_ids for language modelling).
        Returns GPT2Output(logits (B, T, vocab), loss: the mean cross-entropy, float32, or None without labels).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (batch, seq) and inputs_embeds (batch, seq, n_embd), "
                             f"got {'both' if input_ids is not None else 'neither'}")
        if input_ids is not None:
            inputs_embeds = self.wte(self._check_dense_input(input_ids))  # (B, T, C)
        else:
            inputs_embeds = self._check_inputs_embeds(inputs_embeds)
        B, T, _ = inputs_embeds.shape
        positions = torch.arange(T, device=inputs_embeds.device)  # (T,)
        x = self.drop(inputs_embeds + self.wpe(positions))  # (B, T, C)
        for block in self.h:
            x = block(x)
        logits = F.linear(quantize.matmul_input(self, self.ln_f(x)), self.wte.weight)  # (B, T, V)
        loss = None if labels is None else causal_lm_loss(logits, self._check_labels(labels, B, T))
        return GPT2Output(logits=logits, loss=loss)

    def forward_cached(self, inputs_embeds: torch.Tensor,
                       kv_cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
                       ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The dense forward continued over a dense KV cache, with autograd (training-time decoding, e.g.
        fastgpt2.model.gumbel): the same layers, weights and train-mode dropout as forward.

        inputs_embeds : (B, T, n_embd) token embeddings of the next T positions (position embeddings are added here);
        kv_cache : None, or what the previous call returned: one (k, v) per layer, each (B, n_head, t, head_dim).
        Returns logits (B, T, vocab) and the cache extended to t + T positions (new tensors; the old ones untouched).
        """
        inputs_embeds = self._check_inputs_embeds(inputs_embeds)
        B, T, _ = inputs_embeds.shape
        if kv_cache is not None and len(kv_cache) != self.config.n_layer:
            raise ValueError(f"kv_cache has {len(kv_cache)} layers, the model {self.config.n_layer}; pass what "
                             "forward_cached returned")
        start = 0 if kv_cache is None else kv_cache[0][0].shape[2]
        if start + T > self.config.n_positions:
            raise ValueError(f"{start} cached + {T} new positions exceed the model's context of "
                             f"{self.config.n_positions} tokens")
        positions = torch.arange(start, start + T, device=inputs_embeds.device)  # (T,)
        x = self.drop(inputs_embeds + self.wpe(positions))  # (B, T, C)
        new_cache = []
        for i, block in enumerate(self.h):
            x, kv = block.forward_cached(x, None if kv_cache is None else kv_cache[i])
            new_cache.append(kv)
        return F.linear(quantize.matmul_input(self, self.ln_f(x)), self.wte.weight), new_cache  # (B, T, V)

    def forward_paged(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv_caches,
                      logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        """The engine's packed step over the paged KV cache, for inference (no dropout): input_ids, positions (N,)
        int64; kv_caches one (k_cache, v_cache) per layer. Writes the K/V of every token; returns logits
        (len(logits_indices), V), or (N, V) without logits_indices. See fastgpt2.model.inference.forward_paged."""
        return inference.forward_paged(self, input_ids, positions, meta, kv_caches, logits_indices)

    def _check_dense_input(self, input_ids):
        if not isinstance(input_ids, torch.Tensor):
            input_ids = torch.as_tensor(input_ids, device=self.wte.weight.device)
        if input_ids.dim() == 1:
            raise ValueError(f"input_ids must have shape (batch, seq); got 1-D shape {tuple(input_ids.shape)}: use ids[None]")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq); got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
        self._check_length(input_ids.shape[1], "input_ids")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is out of range for a vocabulary of {self.config.vocab_size}")
        return input_ids.to(self.wte.weight.device, torch.long)

    def _check_length(self, T: int, name: str) -> None:
        if T == 0:
            raise ValueError(f"{name} is empty (sequence length 0)")
        if T > self.config.n_positions:
            raise ValueError(f"sequence length {T} exceeds the model's context of {self.config.n_positions} tokens")

    def _check_inputs_embeds(self, inputs_embeds):
        if not isinstance(inputs_embeds, torch.Tensor) or not inputs_embeds.is_floating_point():
            raise ValueError("inputs_embeds must be a float tensor of shape (batch, seq, n_embd)")
        C = self.config.n_embd
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[2] != C:
            raise ValueError(f"inputs_embeds must have shape (batch, seq, {C}); got shape {tuple(inputs_embeds.shape)}")
        self._check_length(inputs_embeds.shape[1], "inputs_embeds")
        return inputs_embeds.to(self.wte.weight.device, self.wte.weight.dtype)

    def _check_labels(self, labels, B: int, T: int) -> torch.Tensor:
        if not isinstance(labels, torch.Tensor):
            labels = torch.as_tensor(labels)
        if tuple(labels.shape) != (B, T):
            raise ValueError(f"labels must have the inputs' shape ({B}, {T}); got shape {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
        labels = labels.to(self.wte.weight.device, torch.long)
        bad = labels[(labels != IGNORE_INDEX) & ((labels < 0) | (labels >= self.config.vocab_size))]
        if bad.numel():
            raise ValueError(f"label {int(bad[0])} is out of range for a vocabulary of {self.config.vocab_size}; "
                             f"use {IGNORE_INDEX} for positions without a target")
        return labels
