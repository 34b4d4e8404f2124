"""The one module that imports the C++ extension `fastgpt2._C`: the C++ paged decode attention here, the CPU sampler in
cpu_sampling.py and the engine's C++ model step (fastgpt2.engine.cpu_step) reach the compiled module through it.
Kernels built on it fall back to the torch references when it is missing."""
from __future__ import annotations

import functools
import warnings

import torch

from fastgpt2.kernels import reference

try:
    from fastgpt2 import _C
except ImportError:  # no compiler at install time, or not built yet
    _C = None

HAS_EXTENSION: bool = _C is not None


@functools.cache
def _warn_no_extension() -> None:
    warnings.warn("fastgpt2._C (the C++ extension) is not built, so CPU decode attention uses the slower torch "
                  "reference; build it with `pip install -e .`", RuntimeWarning, stacklevel=3)


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale: float, num_threads: int | None = None):
    """reference.paged_decode_attention, in C++ for float32 CPU tensors: K/V are read in place through the block
    table (no gather copies), work split over (sequence, head). Other dtypes and devices use the reference."""
    if _C is None or q.dtype != torch.float32 or k_cache.dtype != torch.float32 or not q.is_cpu:
        if _C is None:
            _warn_no_extension()
        return reference.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)
    out = torch.empty(q.shape, dtype=q.dtype)  # C-contiguous even when q is a strided view
    _C.paged_decode_attention(
        q.contiguous().numpy(), k_cache.numpy(), v_cache.numpy(), block_tables.to(torch.int32).contiguous().numpy(),
        seq_lens.to(torch.int32).contiguous().numpy(), out.numpy(), float(scale),
        num_threads or torch.get_num_threads(),
    )
    return out


def new_cpu_step(*args):
    """The C++ model step (csrc/decode.cpp, `_C.CpuStep`); see fastgpt2.engine.cpu_step for its arguments."""
    if _C is None:
        raise RuntimeError("fastgpt2._C is not built; check HAS_EXTENSION before asking for the C++ model step")
    return _C.CpuStep(*args)
