"""int8 (W8A8, q8_0-like) CPU inference, and its error against float32.

The format is llama.cpp's q8_0 with float32 scales instead of float16 ones. Each row of a weight matrix (out, in) is
cut into blocks of 32 consecutive inputs, each with its own scale d = absmax(block) / 127, and every weight is stored
as q = roundf(w * (1 / d)) in [-127, 127] (ties away from zero, q = 0 when d == 0). Each token's activations entering
a quantised matrix are quantised the same way, per block of 32, as llama.cpp quantises them for its q8_0 products;
the C++ kernels (csrc/packed_gemm_q8.cpp) take exact integer dot products per block and sum d_w * d_x * dot over the
blocks in float32. `quantize_weights_int8` writes the dequantised weights float(q) * d into the torch model and makes
its quantised layers (and the tied LM head) quantise their inputs the same way, so that the torch path computes the
same function as the C++ int8 step (to float32 rounding: torch sums in its own order, and a rounding difference can
move an activation's q by one step).
"""
from __future__ import annotations

import copy

import torch

Q8_BLOCK = 32  # inputs per scale


def _q8(blocks: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """blocks (..., 32) float32 quantised and dequantised: d = absmax / 127, q = roundf(v * (1 / d)), float(q) * d
    with d stored as scale_dtype (q is computed with the float32 d, as llama.cpp does)."""
    d = blocks.abs().amax(-1, keepdim=True) / 127.0  # a float32 division
    inverse = torch.where(d != 0, torch.ones_like(d) / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))
    v = blocks * inverse
    t = v.trunc()
    q = t + torch.where((v - t).abs() >= 0.5, v.sign(), torch.zeros_like(v))  # roundf: v - t is exact
    return q * d.to(scale_dtype).to(torch.float32)


def quantize_q8(weight: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dequantised int8 weights of `weight` (out, in) float32, in % 32 == 0: per row and block of 32 inputs
    d = absmax / 127, q = roundf(w * (1 / d)), returned as float(q) * d (float32, same shape; bitwise what the C++
    quantiser computes, _C.quantize_q8). scale_dtype=torch.float16 emulates llama.cpp's q8_0, which computes q with
    the float32 d but stores d as float16 (rounded to nearest even) and dequantises with that."""
    if weight.dim() != 2 or weight.dtype != torch.float32:
        raise ValueError(f"quantize_q8 needs a 2-D float32 weight, got {weight.dtype} of shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if cols % Q8_BLOCK:
        raise ValueError(f"int8 weights need in_features to be a multiple of {Q8_BLOCK}, got {cols}")
    return _q8(weight.detach().reshape(rows, cols // Q8_BLOCK, Q8_BLOCK), scale_dtype).reshape(rows, cols)


def quantize_activations_q8(x: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x (..., K) float32, K % 32 == 0, quantised per token and block of 32 as the weights are (quantize_q8), returned
    dequantised: what an int8 matrix multiplies by."""
    return _q8(x.reshape(*x.shape[:-1], x.shape[-1] // Q8_BLOCK, Q8_BLOCK), scale_dtype).reshape(x.shape)


def matmul_input(owner, x: torch.Tensor) -> torch.Tensor:
    """What a weight matrix multiplies by: x, or x quantised when its weights are int8. owner is the nn.Linear, or
    the GPT2 model for its tied LM head (code that reads the weight directly instead of calling the layer)."""
    scales = getattr(owner, "q8_input_scales", None)
    return x if scales is None else quantize_activations_q8(x, scales)


def _quantize_input(layer, args):
    """Forward pre-hook of a quantised nn.Linear: its input quantised per block of 32."""
    return (matmul_input(layer, args[0]),) + tuple(args[1:])


def linear_weights(model) -> list[torch.Tensor]:
    """Every weight matrix the decode step multiplies by: c_attn, attn c_proj, c_fc and mlp c_proj of each block, and
    wte (the tied LM head, and the token embedding, quantised as llama.cpp quantises token_embd)."""
    weights = [model.wte.weight]
    for block in model.h:
        weights += [block.attn.c_attn.weight, block.attn.c_proj.weight, block.mlp.c_fc.weight, block.mlp.c_proj.weight]
    return weights


@torch.no_grad()
def _quantize_in_place(model, scale_dtype: torch.dtype):
    if model.wte.weight.dtype != torch.float32:
        raise ValueError(f"int8 quantisation needs a float32 model, got {model.wte.weight.dtype}")
    for w in linear_weights(model):
        w.copy_(quantize_q8(w, scale_dtype))
    for block in model.h:  # their inputs quantised too (the LM head's through matmul_input)
        for layer in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
            if getattr(layer, "q8_input_scales", None) is None:
                layer.register_forward_pre_hook(_quantize_input)
            layer.q8_input_scales = scale_dtype
    model.q8_input_scales = scale_dtype
    model._wte_t_cache = None  # the CPU LM head's transposed copy of wte (model/inference.py)
    return model


def quantize_weights_int8(model):
    """int8: every linear weight matrix (linear_weights) replaced in place by its dequantised q8 values, the inputs
    of those layers and of the LM head quantised per block of 32 on every forward, and model.decode_weight_dtype =
    "int8", so that the C++ decode step can keep int8 copies of the matrices (one byte per weight plus a float32
    scale per 32) and compute the same function as the torch path. Biases, layer norms and wpe stay float32 (and
    so does the embedding lookup, of the dequantised wte). Returns the model."""
    _quantize_in_place(model, torch.float32)
    model.decode_weight_dtype = "int8"
    return model


def emulate_q8_0(model):
    """llama.cpp's q8_0 on the same weights and blocks (float16 scales), in place, for comparisons: weights and
    activations quantised as its q8_0 matrix products quantise them; decode_weight_dtype is left as it is. Returns
    the model."""
    return _quantize_in_place(model, torch.float16)


# -- the quantisation error against float32 -------------------------------------------------------------------------
@torch.no_grad()
def _greedy(model, prompt: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """num_tokens greedy tokens after prompt (T,) on the dense KV-cached forward. Returns (num_tokens,) int64."""
    logits, cache = model.forward_cached(model.wte(prompt[None]))
    out = []
    for _ in range(num_tokens):
        token = logits[0, -1].argmax()
        out.append(int(token))
        logits, cache = model.forward_cached(model.wte(token.view(1, 1)), cache)
    return torch.tensor(out)


@torch.no_grad()
def quantization_error(model, prompt_len: int = 32, num_tokens: int = 200, seed: int = 0) -> dict:
    """The int8 weights' (quantize_weights_int8) and llama.cpp q8_0's (emulate_q8_0) logit error against the float32
    `model` (left unchanged), on a random prompt of prompt_len tokens followed by float32's greedy continuation of
    num_tokens.

    Per quantised model: max_rel_error and mean_rel_error, |logits - float32 logits| / std(float32 logits) (the std
    over the vocabulary at each position) over every position and vocabulary entry; top1_agreement, the fraction of
    the num_tokens continuation positions where its argmax is float32's greedy token (the same context, teacher
    forced); greedy_match, the fraction of positions where its own greedy continuation of the prompt equals float32's,
    and greedy_prefix, how many tokens they share before the first difference."""
    model = model.eval()
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (prompt_len,), generator=g)
    reference_tokens = _greedy(model, prompt, num_tokens)
    ids = torch.cat([prompt, reference_tokens])[None]  # (1, prompt_len + num_tokens)
    reference = model(ids).logits[0]  # (T, V)
    scale = reference.std(-1, keepdim=True)
    report = {"prompt_len": prompt_len, "num_tokens": num_tokens, "logit_std": float(scale.mean())}
    for name, quantize in [("int8", quantize_weights_int8), ("q8_0", emulate_q8_0)]:
        quantized = quantize(copy.deepcopy(model))
        logits = quantized(ids).logits[0]
        error = (logits - reference).abs() / scale
        top1 = logits[prompt_len - 1:-1].argmax(-1)  # the predictions of the continuation's tokens
        tokens = _greedy(quantized, prompt, num_tokens)
        differ = (tokens != reference_tokens).nonzero()
        report[name] = {
            "max_rel_error": float(error.max()),
            "mean_rel_error": float(error.mean()),
            "top1_agreement": float((top1 == reference_tokens).float().mean()),
            "greedy_match": float((tokens == reference_tokens).float().mean()),
            "greedy_prefix": int(differ[0]) if len(differ) else num_tokens,
        }
    return report
