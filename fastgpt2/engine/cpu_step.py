"""CpuStep: the engine's wrapper of the C++ model step (csrc/decode.cpp, reached through fastgpt2.kernels.native):
every CPU step of a float32 model, prefill chunks, decodes and mixed, in one call per step."""
from __future__ import annotations

import os

import numpy as np
import torch

from fastgpt2.kernels import dispatch, native


def native_decode_disabled() -> bool:
    """FASTGPT2_NATIVE_DECODE=0 turns the C++ step off (the torch model runs every step)."""
    return os.environ.get("FASTGPT2_NATIVE_DECODE", "1") == "0"


def greedy_screen_enabled() -> bool:
    """FASTGPT2_GREEDY_SCREEN=0 turns off greedy steps' int8 screen of the LM head (every logit in float32 instead;
    the tokens are the same either way)."""
    return os.environ.get("FASTGPT2_GREEDY_SCREEN", "1") != "0"


class CpuStep:
    """GPT-2's step in C++ (csrc/decode.cpp) over packed tokens of a float32 model on CPU: any mix of prefill chunks
    and decodes, one call per step instead of ~150 torch ops, on a persistent thread pool.

    Batch invariance: each token's K/V, attention output and logits are computed by the same float32 operations
    whatever else is in the step, so a request's logits are bitwise the same alone or in any batch, in a prefill chunk
    of any size, after a prefix-cache hit or after recomputation (on a given machine and kernel variant, whatever the
    thread count).

    The C++ side packs the model's weight matrices once, at construction, for its GEMM (float32, or bfloat16 when
    model.decode_weight_dtype is bfloat16 (GPT2.round_weights_to_bfloat16): half the bytes per step, float32
    arithmetic; or int8 when it is "int8" (GPT2.quantize_weights_int8): about 1.1 bytes per weight, the activations
    quantised too and integer dot products per block of 32) and reads the
    small vectors in place: a model whose parameters are replaced or modified needs a new CpuStep (ModelRunner.
    refresh_weights). The packed copy costs memory: 4, 2 or ~1.1 bytes per weight beside the model's own.
    """

    # A step of more tokens runs as several calls in packed order (a later call's tokens attend to the K/V an earlier
    # one wrote, so the result is the same bitwise): it bounds the step's scratch buffers (about 10 floats per token
    # and embedding channel, 60 MB for 2048 tokens of GPT-2 XL). The engine's default token budget is 2048 per step.
    max_tokens_per_call = 2048

    def __init__(self, model, kv_cache: torch.Tensor):
        c = model.config
        arr = lambda t: t.detach().numpy()  # noqa: E731 - shared memory, no copy; the array keeps its tensor alive
        layers = [
            [arr(t) for t in (b.ln_1.weight, b.ln_1.bias, b.attn.c_attn.weight, b.attn.c_attn.bias,
                              b.attn.c_proj.weight, b.attn.c_proj.bias, b.ln_2.weight, b.ln_2.bias,
                              b.mlp.c_fc.weight, b.mlp.c_fc.bias, b.mlp.c_proj.weight, b.mlp.c_proj.bias)]
            for b in model.h
        ]
        weight_dtype = {torch.bfloat16: "bfloat16", "int8": "int8"}.get(model.decode_weight_dtype, "float32")
        self._step = native.new_cpu_step(arr(model.wte.weight), arr(model.wpe.weight), layers, arr(model.ln_f.weight),
                                         arr(model.ln_f.bias), c.n_head, c.layer_norm_epsilon, weight_dtype,
                                         greedy_screen_enabled())
        self._kv_cache = kv_cache.numpy()
        self.vocab_size = c.vocab_size

    @property
    def weight_dtype(self) -> str:
        """'float32', 'bfloat16' or 'int8': the weight matrices the C++ step reads."""
        return self._step.weight_dtype

    @property
    def greedy_screen(self) -> bool:
        """Whether greedy steps pick through the LM head's int8 screen (float32 and bf16 weights; see
        csrc/argmax_screen.h): the float32 logits of only the rows that can still be the largest."""
        return self._step.greedy_screen

    @staticmethod
    def enabled() -> bool:
        """Whether the C++ step is built, loaded for this CPU and not switched off."""
        return native.HAS_EXTENSION and not native_decode_disabled() and not dispatch.force_reference()

    @staticmethod
    def supports(model, kv_cache: torch.Tensor) -> bool:
        w = model.wte.weight
        return (CpuStep.enabled() and w.device.type == "cpu" and w.dtype == torch.float32 and kv_cache.dtype == torch.float32
                and kv_cache.is_contiguous() and model.config.n_embd % 8 == 0)

    def __call__(self, token_ids, positions, slots, seq_index, block_tables, logits_indices,
                 greedy_limit: int | None = None) -> torch.Tensor:
        """token_ids, positions, slots: (N,) int64; seq_index: (N,) int32, each token's row of block_tables
        (S, max_blocks) int32; logits_indices: (R,) int64. Writes every token's K/V into the pool; returns float32
        logits (R, vocab) of the rows logits_indices, in that order. With greedy_limit, returns instead greedy
        decoding's tokens (R,) int64: per row the argmax over ids [0, greedy_limit) of those logits (torch.argmax's
        choice: the first of equal values, or the first NaN), picked in the LM head's epilogue without the logits
        being written."""
        return self.run_arrays(token_ids.numpy(), positions.numpy(), slots.numpy(), seq_index.numpy(),
                               block_tables.numpy(), logits_indices.numpy(), greedy_limit)

    def run_arrays(self, token_ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, seq_index: np.ndarray,
                   block_tables: np.ndarray, logits_indices: np.ndarray,
                   greedy_limit: int | None = None) -> torch.Tensor:
        """__call__ on numpy arrays of the same dtypes and shapes, which ModelRunner.prepare_cpu builds without a torch
        operation: a batch-1 greedy step on a 2-core Intel Xeon took 15.95 ms with the tensors of prepare() and their
        conversions and 14.88 ms without in a slow spell of the host (one process, alternated), the same in a faster
        one (~13.6 ms). Returns a torch tensor."""
        num_threads = torch.get_num_threads()
        greedy = greedy_limit is not None
        num_rows = len(logits_indices)
        out = (np.empty(num_rows, dtype=np.int64) if greedy
               else np.empty((num_rows, self.vocab_size), dtype=np.float32))

        def call(start: int, end: int, rows: np.ndarray, dest: np.ndarray) -> None:
            args = (token_ids[start:end], positions[start:end], slots[start:end], seq_index[start:end], block_tables,
                    rows, self._kv_cache, dest)
            if greedy:
                self._step.forward_greedy(*args, greedy_limit, num_threads)
            else:
                self._step.forward(*args, num_threads)

        n, cap = len(token_ids), self.max_tokens_per_call
        if n <= cap:
            call(0, n, logits_indices, out)
            return torch.from_numpy(out)
        for start in range(0, n, cap):
            end = min(start + cap, n)
            rows = np.flatnonzero((logits_indices >= start) & (logits_indices < end))
            part = np.empty((len(rows),) + out.shape[1:], dtype=out.dtype)
            call(start, end, logits_indices[rows] - start, part)
            out[rows] = part
        return torch.from_numpy(out)
