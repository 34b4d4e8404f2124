"""Picks the Triton kernel on CUDA tensors and the pure-torch reference elsewhere.

Set FASTGPT2_FORCE_REFERENCE=1 to use the references on CUDA too (debugging), or FASTGPT2_FORCE_TRITON=1 to run the
Triton kernels on CPU tensors too (only meaningful under TRITON_INTERPRET=1: it is how the tests drive the whole engine
through the kernels without a GPU).
"""
from __future__ import annotations

import importlib
import os

import torch

from fastgpt2.kernels import reference

# public name -> module under fastgpt2.kernels that holds the Triton wrapper of the same name
_TRITON_MODULES = {
    "reshape_and_cache": "paged_attention",
    "paged_decode_attention": "paged_attention",
    "prefill_attention": "prefill_attention",
    "flash_attention": "flash_attention",
    "topk_topp_minp_sample": "sampling",
    "cross_entropy": "cross_entropy",
}


def use_triton(device: torch.device) -> bool:
    """True when the Triton kernels should run for tensors on `device`."""
    if os.environ.get("FASTGPT2_FORCE_REFERENCE", "0") == "1":
        return False
    return device.type == "cuda" or os.environ.get("FASTGPT2_FORCE_TRITON", "0") == "1"


def get(name: str, device: torch.device):
    """The implementation of kernel `name` for `device`: the Triton wrapper on CUDA, else the torch reference."""
    if use_triton(device):
        module = importlib.import_module(f"fastgpt2.kernels.{_TRITON_MODULES[name]}")
        return getattr(module, name)
    return getattr(reference, name)
