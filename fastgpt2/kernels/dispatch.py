"""The one place that picks an implementation per operation and device: the Triton kernel on CUDA, the C++ kernel
(native._C, the ISA variant kernels/native.py picked) on CPU where one exists and is built, else the pure-torch
reference.

FASTGPT2_FORCE_REFERENCE=1 forces the references everywhere (CUDA, the C++ kernels and the C++ step included;
for debugging). FASTGPT2_FORCE_TRITON=1 runs the Triton kernels on CPU tensors too (only meaningful under
TRITON_INTERPRET=1: it is how the tests drive the whole engine through the kernels without a GPU).
"""
from __future__ import annotations

import importlib
import os

import torch

from fastgpt2.kernels import reference

# operation -> module under fastgpt2.kernels holding the Triton wrapper of the same name
_TRITON_MODULES = {
    "reshape_and_cache": "paged_attention",
    "paged_decode_attention": "paged_attention",
    "prefill_attention": "prefill_attention",
    "flash_attention": "flash_attention",
    "topk_topp_minp_sample": "sampling",
    "cross_entropy": "cross_entropy",
}
# operation -> module under fastgpt2.kernels holding its CPU (C++) wrapper; each falls back to the reference by itself
# (saying so once) when the extension is not built, and takes the reference for inputs it does not handle.
_CPU_MODULES = {
    "paged_decode_attention": "native",
    "topk_topp_minp_sample": "cpu_sampling",
}


def force_reference() -> bool:
    """FASTGPT2_FORCE_REFERENCE=1: every operation runs its torch reference."""
    return os.environ.get("FASTGPT2_FORCE_REFERENCE", "0") == "1"


def use_triton(device: torch.device) -> bool:
    """True when the Triton kernels should run for tensors on `device`."""
    if force_reference():
        return False
    return device.type == "cuda" or os.environ.get("FASTGPT2_FORCE_TRITON", "0") == "1"


def get(name: str, device: torch.device):
    """The implementation of operation `name` for tensors on `device` (Triton, C++ or the torch reference)."""
    if name not in _TRITON_MODULES:
        raise KeyError(f"no kernel named {name!r}; known: {', '.join(sorted(_TRITON_MODULES))}")
    if use_triton(device):
        return getattr(importlib.import_module(f"fastgpt2.kernels.{_TRITON_MODULES[name]}"), name)
    if device.type == "cpu" and name in _CPU_MODULES and not force_reference():
        return getattr(importlib.import_module(f"fastgpt2.kernels.{_CPU_MODULES[name]}"), name)
    return getattr(reference, name)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Greedy decoding's torch.argmax(logits, dim=-1) (first index of each row's largest value, or of its first NaN):
    the C++ kernel for CPU logits (cpu_sampling.argmax: the same indices), torch elsewhere."""
    if logits.device.type == "cpu" and not force_reference():
        return importlib.import_module("fastgpt2.kernels.cpu_sampling").argmax(logits)
    return torch.argmax(logits, dim=-1)


def row_logprobs(logits: torch.Tensor, targets: list[int] | None, top_n: int, rows: list[int] | None = None):
    """Per row of (B, V) logits (or per row listed in `rows`), the logprob of targets[i] (-1: none) and the top_n
    tokens with theirs, as lists (see cpu_sampling.row_logprobs): the C++ kernel for float32 CPU logits, torch's
    log_softmax elsewhere."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and not force_reference():
        return importlib.import_module("fastgpt2.kernels.cpu_sampling").row_logprobs(logits, targets, top_n, rows=rows)
    return reference.row_logprobs(logits, targets, top_n, rows)


def cpu_kernel_info() -> dict:
    """For `fastgpt2 info`: the CPU's model name, the C++ kernel variant in use (None: the torch kernels, `why_not`
    says why), the variants built and those this CPU runs."""
    from fastgpt2.kernels import native

    return {"cpu": native.cpu_model_name(), "isa": native.ISA,
            "why_not": None if native.ISA else native.why_no_extension(), "built": native.built_variants(),
            "runnable": native.available_variants()}
