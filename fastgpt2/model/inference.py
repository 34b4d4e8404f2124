"""GPT-2's inference side: the packed, paged forward the engine runs, and the CPU layouts that make it fast (W @ x.T
projections, the sliced and transposed LM head, bfloat16-rounded weights). The module's own `forward` (training and
the dense reference) uses none of this."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastgpt2.kernels import dispatch
from fastgpt2.model import quantize
from fastgpt2.model.attention import AttentionMetadata, paged_attention

LM_HEAD_ROWS = 1024  # vocabulary rows per slice of the CPU LM head


def linear(layer: nn.Linear, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """layer(x) (then tanh-GELU when asked), for CPU inference on 9..256 packed rows as W @ x.T: MKL runs that
    1.2-1.5x faster than F.linear's x @ W.T at 64 rows (124M shapes; no gain at 512). The result is a transposed
    view of the (out, rows) product; the GELU runs on the product itself. x: (N, in) -> (N, out)."""
    if (x.dim() == 2 and 8 < x.shape[0] <= 256 and x.device.type == "cpu" and not torch.is_grad_enabled()
            and not dispatch.use_triton(x.device)):  # the Triton kernels want unit-stride rows
        y = torch.addmm(layer.bias[:, None], layer.weight, quantize.matmul_input(layer, x).t())  # (out, rows)
        return (F.gelu(y, approximate="tanh") if gelu else y).t()
    y = layer(x)
    return F.gelu(y, approximate="tanh") if gelu else y


def lm_head(model, x: torch.Tensor) -> torch.Tensor:
    """Logits over the vocabulary, tied to model.wte. x: (N, C) -> (N, V).

    CPU inference picks the GEMV/GEMM layout MKL reads fastest (measured on the 124M head, one thread: a (C, V) copy
    of wte makes batch-1 decode's head 1.6x faster; W @ x.T is 1.5x faster at 64 rows)."""
    weight = model.wte.weight
    x = quantize.matmul_input(model, x)
    if x.dim() != 2 or weight.device.type != "cpu" or torch.is_grad_enabled():
        return F.linear(x, weight)
    if x.shape[0] <= 8:
        return torch.mm(x, _wte_transposed(model))
    # W @ x.T in slices of 1024 vocabulary rows: each slice's product stays in cache (20% faster at 64 rows) and is
    # transposed into a contiguous (N, V) result there (argmax over a transposed view costs 16 ms at 64 rows).
    num_rows, vocab_size = x.shape[0], weight.shape[0]
    out = torch.empty(num_rows, vocab_size, dtype=x.dtype)  # (N, V)
    part = torch.empty(LM_HEAD_ROWS, num_rows, dtype=x.dtype)  # (slice, N)
    xt = x.t()
    for start in range(0, vocab_size, LM_HEAD_ROWS):
        end = min(start + LM_HEAD_ROWS, vocab_size)
        torch.mm(weight[start:end], xt, out=part[: end - start])
        out[:, start:end].copy_(part[: end - start].t())
    return out


def _wte_transposed(model) -> torch.Tensor:
    """A (C, V) contiguous copy of wte, cached on the model until wte is replaced or modified in place."""
    weight = model.wte.weight
    key = (weight.data_ptr(), weight._version, weight.dtype)
    cached = getattr(model, "_wte_t_cache", None)
    if cached is None or cached[0] != key:
        cached = (key, weight.detach().t().contiguous())
        model._wte_t_cache = cached
    return cached[1]


@torch.no_grad()
def round_weights_to_bfloat16(model):
    """bfloat16 weights with float32 arithmetic (CPUs without native bf16): every float32 parameter is rounded to
    the nearest bfloat16 in place, so that the torch path and the C++ step (which keeps bf16 copies of the
    weight matrices, half the bytes per token) compute the same function."""
    if model.wte.weight.dtype != torch.float32:
        raise ValueError(f"round_weights_to_bfloat16 needs a float32 model, got {model.wte.weight.dtype}")
    for p in model.parameters():
        p.copy_(p.to(torch.bfloat16).to(torch.float32))
    model._wte_t_cache = None
    model.decode_weight_dtype = torch.bfloat16
    return model


def forward_paged(model, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv_caches,
                  logits_indices: torch.Tensor | None = None) -> torch.Tensor:
    """The engine's step over packed tokens: input_ids, positions (N,) int64; kv_caches one (k_cache, v_cache) per
    layer, each (num_blocks, block_size, nh, hs). Writes every token's K/V at meta.slot_mapping and returns logits
    (len(logits_indices), V), or (N, V) without logits_indices. No dropout, whatever the module's mode.

    Steps, per block: 1. ln_1, c_attn -> q, k, v; 2. paged attention (K/V written to the cache first); 3. c_proj,
    residual; 4. ln_2, MLP, residual. Then ln_f on the rows whose next token is needed and the tied LM head."""
    n_head, head_dim = model.config.n_head, model.config.head_dim
    x = model.wte(input_ids) + model.wpe(positions)  # (N, C)
    N, C = x.shape
    for i, block in enumerate(model.h):
        attn, mlp = block.attn, block.mlp
        q, k, v = linear(attn.c_attn, block.ln_1(x)).view(N, 3, n_head, head_dim).unbind(1)  # 3 x (N, nh, hs)
        y = paged_attention(q, k, v, kv_caches[i], meta).reshape(N, C)
        x = x + linear(attn.c_proj, y)
        x = x + linear(mlp.c_proj, linear(mlp.c_fc, block.ln_2(x), gelu=True))
    if logits_indices is not None:
        x = x[logits_indices]  # only the rows whose next token is needed: the LM head is 40% of a decode step
    return lm_head(model, model.ln_f(x))
