"""GPT-2 exactly as published, with checkpoint parameter names, and one attention seam for the paged engine."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastgpt2.model.attention import AttentionMetadata, dense_causal_attention, paged_attention
from fastgpt2.model import checkpoint
from fastgpt2.model.config import GPT2Config
from fastgpt2.kernels import dispatch


def linear(layer: nn.Linear, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """layer(x) (then tanh-GELU when asked), for CPU inference on 9..256 packed rows as W @ x.T: MKL runs that
    1.2-1.5x faster than F.linear's x @ W.T at 64 rows (124M shapes; no gain at 512). The result is a transposed
    view of the (out, rows) product; the GELU runs on the product itself."""
    if (x.dim() == 2 and 8 < x.shape[0] <= 256 and x.device.type == "cpu" and not torch.is_grad_enabled()
            and not dispatch.use_triton(x.device)):  # the Triton kernels want unit-stride rows
        y = torch.addmm(layer.bias[:, None], layer.weight, x.t())  # (out, rows)
        return (F.gelu(y, approximate="tanh") if gelu else y).t()
    y = layer(x)
    return F.gelu(y, approximate="tanh") if gelu else y


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        # Stored as nn.Linear (out, in): the checkpoint's Conv1D (in, out) weights are transposed once at load time,
        # so every decode-step GEMV reads rows contiguously.
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x, meta: AttentionMetadata | None = None, kv_cache=None):
        qkv = linear(self.c_attn, x)
        if meta is None:
            B, T, C = x.shape
            q, k, v = qkv.view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hs)
            y = dense_causal_attention(q, k, v)  # (B, nh, T, hs)
            y = y.transpose(1, 2).reshape(B, T, C)
        else:
            N, C = x.shape
            q, k, v = qkv.view(N, 3, self.n_head, self.head_dim).unbind(1)  # 3 x (N, nh, hs)
            y = paged_attention(q, k, v, kv_cache, meta).reshape(N, C)
        return linear(self.c_proj, y)


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return linear(self.c_proj, linear(self.c_fc, x, gelu=True))


class Block(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, meta=None, kv_cache=None):
        x = x + self.attn(self.ln_1(x), meta, kv_cache)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    """GPT-2 language model; the output head is tied to `wte`.

    `model(input_ids)` with input_ids (B, T) int64 returns logits (B, T, vocab) on the dense causal path.
    The engine calls `model(input_ids, positions, meta, kv_caches, logits_indices)` with packed (N,) tokens.
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
        # Set by round_weights_to_bfloat16: the C++ CPU decode step then stores the weight matrices in this dtype.
        self.decode_weight_dtype: torch.dtype | None = None
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

    @torch.no_grad()
    def round_weights_to_bfloat16(self) -> "GPT2":
        """bfloat16 weights with float32 arithmetic (CPUs without native bf16): every float32 parameter is rounded to
        the nearest bfloat16 in place, so that the torch path and the C++ decode step (which keeps bf16 copies of the
        weight matrices, half the bytes per token) compute the same function."""
        if self.wte.weight.dtype != torch.float32:
            raise ValueError(f"round_weights_to_bfloat16 needs a float32 model, got {self.wte.weight.dtype}")
        for p in self.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
        self._wte_t_cache = None
        self.decode_weight_dtype = torch.bfloat16
        return self

    @classmethod
    def from_pretrained(cls, name_or_path, device=None, dtype=None) -> "GPT2":
        """Official weights by preset/hub name, a local Hugging Face directory, or random weights from a GPT2Config."""
        return checkpoint.load_model(cls, name_or_path, device=device, dtype=dtype)

    def save_pretrained(self, directory, tokenizer=None) -> None:
        """Write config.json, model.safetensors, vocab.json and merges.txt (Hugging Face GPT-2 format)."""
        checkpoint.save_pretrained(self, directory, tokenizer)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids, positions=None, meta: AttentionMetadata | None = None, kv_caches=None, logits_indices=None):
        if meta is None:
            input_ids = self._check_dense_input(input_ids)
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
        x = self.wte(input_ids) + self.wpe(positions)  # (B, T, C) dense or (N, C) packed
        for i, block in enumerate(self.h):
            x = block(x, meta, None if kv_caches is None else kv_caches[i])
        if logits_indices is not None:
            x = x[logits_indices]  # only the rows whose next token is needed: the LM head is 40% of a decode step
        return self.lm_head(self.ln_f(x))

    LM_HEAD_ROWS = 1024  # vocabulary rows per slice of the CPU LM head

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over the vocabulary, tied to wte. x: (..., C) -> (..., V).

        CPU inference picks the GEMV/GEMM layout MKL reads fastest (measured on the 124M head, one thread: a
        (C, V) copy of wte makes batch-1 decode's head 1.6x faster; W @ x.T is 1.5x faster at 64 rows)."""
        weight = self.wte.weight
        if x.dim() != 2 or weight.device.type != "cpu" or torch.is_grad_enabled():
            return F.linear(x, weight)
        if x.shape[0] <= 8:
            return torch.mm(x, self._wte_transposed())
        # W @ x.T in slices of 1024 vocabulary rows: each slice's product stays in cache (20% faster at 64 rows) and
        # is transposed into a contiguous (N, V) result there (argmax over a transposed view costs 16 ms at 64 rows).
        num_rows, vocab_size = x.shape[0], weight.shape[0]
        out = torch.empty(num_rows, vocab_size, dtype=x.dtype)  # (N, V)
        part = torch.empty(self.LM_HEAD_ROWS, num_rows, dtype=x.dtype)  # (slice, N)
        xt = x.t()
        for start in range(0, vocab_size, self.LM_HEAD_ROWS):
            end = min(start + self.LM_HEAD_ROWS, vocab_size)
            torch.mm(weight[start:end], xt, out=part[: end - start])
            out[:, start:end].copy_(part[: end - start].t())
        return out

    def _wte_transposed(self) -> torch.Tensor:
        weight = self.wte.weight
        key = (weight.data_ptr(), weight._version, weight.dtype)
        cached = getattr(self, "_wte_t_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, weight.detach().t().contiguous())
            self._wte_t_cache = cached
        return cached[1]

    def _check_dense_input(self, input_ids):
        if not isinstance(input_ids, torch.Tensor):
            input_ids = torch.as_tensor(input_ids, device=self.wte.weight.device)
        if input_ids.dim() == 1:
            raise ValueError(f"input_ids must have shape (batch, seq); got 1-D shape {tuple(input_ids.shape)}: use ids[None]")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq); got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
        T = input_ids.shape[1]
        if T == 0:
            raise ValueError("input_ids is empty (sequence length 0)")
        if T > self.config.n_positions:
            raise ValueError(f"sequence length {T} exceeds the model's context of {self.config.n_positions} tokens")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is out of range for a vocabulary of {self.config.vocab_size}")
        return input_ids.to(self.wte.weight.device, torch.long)
