"""Triton FlashAttention-2 (training path): forward and backward against autograd through the SDPA reference.

Padded (B, H, T, D) batches and packed (N, H, D) sequences with cu_seqlens, causal and not. Triton runs natively on
CUDA and under its CPU interpreter elsewhere (TRITON_INTERPRET=1 set before triton is imported).
"""
from __future__ import annotations

import os

import pytest
import torch

from fastgpt2.kernels import flash_attention, paged_attention, reference

NUM_HEADS, HEAD_DIM = 2, 64
# Outputs: kernel vs float32 reference on the same rounded inputs (output rounding + P rounded before P @ V).
FWD_TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
# Gradients: float32 is the exactness check; fp16/bf16 also round dS and P before their dots.
GRAD_TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=6e-2, rtol=6e-2),
}
DTYPES = list(FWD_TOLERANCES)
SMALL_TILES = dict(fwd_config=(16, 32, 4, 1), bwd_config=(32, 16, 4, 1))  # many tiles on tiny sizes; BLOCK_M != BLOCK_N
# (padded (B, T) or None, packed sequence lengths or None)
SHAPES = [
    ((1, 1), None),
    ((3, 37), None),
    ((2, 70), None),
    (None, [1, 15, 40]),
    (None, [1, 16, 17, 31, 5, 2, 20]),
]


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))


@pytest.fixture(params=["cpu", CUDA])
def device(request, monkeypatch):
    if request.param == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 set before triton is imported")
    monkeypatch.setattr(paged_attention, "POISON_BUFFERS", True)  # out, lse, delta, dq, dk, dv all start as NaN
    return torch.device(request.param)


def make_inputs(padded, packed, dtype, seed=0):
    """q, k, v (float32 masters, rounded through dtype), cu_seqlens or None."""
    gen = torch.Generator().manual_seed(seed)
    if packed is None:
        shape, cu = (padded[0], NUM_HEADS, padded[1], HEAD_DIM), None
    else:
        shape = (sum(packed), NUM_HEADS, HEAD_DIM)
        cu = torch.tensor([0] + packed).cumsum(0).to(torch.int32)
    return [torch.randn(shape, generator=gen).to(dtype).float() for _ in range(3)], cu


def run_both(qkv, cu, causal, dtype, device, tiles):
    """(kernel out, grads) and (reference out, grads), both for the same random upstream gradient, on the CPU."""
    do = torch.randn(qkv[0].shape, generator=torch.Generator().manual_seed(99))
    leaves = [t.detach().to(device=device, dtype=dtype).clone().requires_grad_() for t in qkv]
    out = flash_attention.flash_attention(*leaves, causal, None if cu is None else cu.to(device), **tiles)
    out.backward(do.to(device=device, dtype=dtype))
    ref_leaves = [t.detach().clone().requires_grad_() for t in qkv]
    ref_out = reference.flash_attention(*ref_leaves, causal, cu)
    ref_out.backward(do.to(dtype).float())
    got = [out.detach().cpu().float()] + [t.grad.cpu().float() for t in leaves]
    want = [ref_out.detach()] + [t.grad for t in ref_leaves]
    return got, want


@pytest.mark.parametrize("tiles", [SMALL_TILES, {}], ids=["small_tiles", "default_tiles"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded,packed", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_flash_attention_forward(device, dtype, padded, packed, causal, tiles):
    qkv, cu = make_inputs(padded, packed, dtype)
    with torch.no_grad():
        got = flash_attention.flash_attention(*[t.to(device=device, dtype=dtype) for t in qkv], causal,
                                              None if cu is None else cu.to(device), **tiles)
    want = reference.flash_attention(*qkv, causal, cu)
    assert got.dtype == dtype and got.shape == qkv[0].shape
    torch.testing.assert_close(got.cpu().float(), want, **FWD_TOLERANCES[dtype])


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded,packed", SHAPES)
def test_flash_attention_backward_float32(device, padded, packed, causal):
    qkv, cu = make_inputs(padded, packed, torch.float32, seed=1)
    got, want = run_both(qkv, cu, causal, torch.float32, device, SMALL_TILES)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, w, **GRAD_TOLERANCES[torch.float32], msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("padded,packed", [((3, 37), None), (None, [1, 15, 40])])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flash_attention_backward_half(device, dtype, padded, packed):
    qkv, cu = make_inputs(padded, packed, dtype, seed=2)
    got, want = run_both(qkv, cu, True, dtype, device, {})
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, w, **GRAD_TOLERANCES[dtype], msg=lambda m, name=name: f"{name}: {m}")


def test_flash_attention_strided_views(device):
    """(B, H, T, D) views of one (B, T, 3C) projection, as the model produces them, need no copies."""
    qkv = torch.randn(2, 19, 3 * NUM_HEADS * HEAD_DIM, generator=torch.Generator().manual_seed(3))
    views = [t.view(2, 19, NUM_HEADS, HEAD_DIM).transpose(1, 2)  # (B, H, T, D), stride 3C between positions
             for t in qkv.to(device).split(NUM_HEADS * HEAD_DIM, dim=2)]
    got = flash_attention.flash_attention(*views, **SMALL_TILES)
    want = reference.flash_attention(*[t.cpu() for t in views])
    torch.testing.assert_close(got.cpu(), want, **FWD_TOLERANCES[torch.float32])


def test_packed_reference_matches_padded():
    """The packed reference on equal-length sequences equals the padded reference (checks its segment bookkeeping)."""
    q, k, v = torch.randn(3, 3, 5, NUM_HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(4))  # (3, B, T, H, D)
    cu = torch.tensor([0, 5, 10, 15], dtype=torch.int32)
    packed = reference.flash_attention(*[t.reshape(15, NUM_HEADS, HEAD_DIM) for t in (q, k, v)], True, cu)
    padded = reference.flash_attention(*[t.transpose(1, 2) for t in (q, k, v)], True)
    torch.testing.assert_close(packed.view(3, 5, NUM_HEADS, HEAD_DIM).transpose(1, 2), padded)


def test_flash_attention_rejects_mismatched_inputs():
    q = torch.randn(1, NUM_HEADS, 4, HEAD_DIM)
    with pytest.raises(ValueError, match="share one shape"):
        flash_attention.flash_attention(q, q[:, :, :3], q)
    with pytest.raises(ValueError, match="cu_seqlens"):
        flash_attention.flash_attention(q[0], q[0], q[0], True, torch.tensor([0, 4]))
