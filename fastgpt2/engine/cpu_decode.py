"""CpuDecodeStep: the engine's wrapper of the C++ decode step (csrc/decode.cpp, reached through
fastgpt2.kernels.native): one call per decode step of up to 256 CPU sequences."""
from __future__ import annotations

import os

import torch

from fastgpt2.kernels import dispatch, native


def native_decode_disabled() -> bool:
    """FASTGPT2_NATIVE_DECODE=0 turns the C++ decode step off (the torch model runs every step)."""
    return os.environ.get("FASTGPT2_NATIVE_DECODE", "1") == "0"


class CpuDecodeStep:
    """GPT-2's decode step in C++ (csrc/decode.cpp) for CPU decode batches of a float32 model: one call per step
    instead of ~150 torch ops on a persistent thread pool; matrix-vector kernels at close to the memory bandwidth for
    small batches, a register-blocked GEMM for larger ones.

    It reads the model's parameters in place (the C++ side holds numpy views of them); a model whose parameters are
    replaced needs a new CpuDecodeStep. When model.decode_weight_dtype is bfloat16 (GPT2.round_weights_to_bfloat16),
    the C++ side keeps bfloat16 copies of the weight matrices and reads those: half the bytes per step, same float32
    arithmetic. When it is "int8" (GPT2.quantize_weights_int8) the parameters already hold the dequantised int8
    weights, which this step reads as float32 (the same function; int8 storage is csrc/packed_gemm.h's PackedMatrix<q8>).
    """

    # Larger decode batches run the torch model. Up to this size the C++ step is faster at every batch: GEMV kernels
    # below 12 sequences, a packed-panel GEMM above (csrc/gemm.cpp; 64 concurrent: 162 vs 206 ms per step through
    # MKL in the torch model, same run). A build without AVX2 has no GEMM, and its GEMV loses to MKL above ~32.
    max_batch_size = 256 if native.cpu_decoder_has_gemm() else 32

    def __init__(self, model, kv_cache: torch.Tensor):
        c = model.config
        arr = lambda t: t.detach().numpy()  # noqa: E731 - shared memory, no copy; the array keeps its tensor alive
        layers = [
            [arr(t) for t in (b.ln_1.weight, b.ln_1.bias, b.attn.c_attn.weight, b.attn.c_attn.bias,
                              b.attn.c_proj.weight, b.attn.c_proj.bias, b.ln_2.weight, b.ln_2.bias,
                              b.mlp.c_fc.weight, b.mlp.c_fc.bias, b.mlp.c_proj.weight, b.mlp.c_proj.bias)]
            for b in model.h
        ]
        weight_dtype = "bfloat16" if model.decode_weight_dtype == torch.bfloat16 else "float32"
        self._decoder = native.new_cpu_decoder(arr(model.wte.weight), arr(model.wpe.weight), layers, arr(model.ln_f.weight),
                                      arr(model.ln_f.bias), c.n_head, c.layer_norm_epsilon, weight_dtype)
        self._kv_cache = kv_cache.numpy()
        self.vocab_size = c.vocab_size

    @property
    def weight_dtype(self) -> str:
        """'float32' or 'bfloat16': the weight matrices the C++ step reads."""
        return self._decoder.weight_dtype

    @staticmethod
    def supports(model, kv_cache: torch.Tensor) -> bool:
        w = model.wte.weight
        return (native.HAS_EXTENSION and not native_decode_disabled() and not dispatch.force_reference() and w.device.type == "cpu"
                and w.dtype == torch.float32 and kv_cache.dtype == torch.float32 and kv_cache.is_contiguous()
                and model.config.n_embd % 8 == 0)

    def __call__(self, token_ids, positions, slots, block_tables, seq_lens) -> torch.Tensor:
        """token_ids, positions, slots: (B,) int64; block_tables: (B, max_blocks) int32; seq_lens: (B,) int32.
        Writes the new K/V into the pool; returns float32 logits (B, vocab)."""
        logits = torch.empty(len(token_ids), self.vocab_size, dtype=torch.float32)
        self._decoder.forward(token_ids.numpy(), positions.numpy(), slots.numpy(), block_tables.numpy(),
                              seq_lens.numpy(), self._kv_cache, logits.numpy(), torch.get_num_threads())
        return logits
