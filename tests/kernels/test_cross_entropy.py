"""Triton fused cross-entropy vs reference.cross_entropy and torch.nn.functional.cross_entropy: loss and gradient."""
import os

import pytest
import torch
import torch.nn.functional as F

from fastgpt2.kernels import reference
from fastgpt2.kernels.cross_entropy import cross_entropy, cross_entropy_backward, cross_entropy_forward

# Losses come from the same float32-upcast logits on both sides: 1e-5 for every dtype. Gradients are rounded to the
# logits' dtype: one ulp (bf16 2^-7 ~ 7.8e-3, fp16 2^-10 ~ 9.8e-4 relative) plus rounding of the float32 values.
LOSS_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=1e-5),
}
IGNORE = -100


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if request.param == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1")
    return torch.device(request.param)


def _inputs(num_rows: int, vocab_size: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed * 7919 + num_rows * 131 + vocab_size)
    logits = (2.0 * torch.randn(num_rows, vocab_size, generator=gen)).to(dtype)
    targets = torch.randint(0, vocab_size, (num_rows,), generator=gen)
    targets[1::3] = IGNORE  # every third row ignored (none when num_rows == 1)
    return logits, targets, gen


def _loss_and_grad(fn, logits, targets, reduction, upstream):
    x = logits.clone().requires_grad_(True)
    loss = fn(x, targets, ignore_index=IGNORE, reduction=reduction)
    (loss * upstream).sum().backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_rows,vocab_size", [(1, 37), (5, 1000), (33, 37), (3, 50257)])
def test_matches_reference(device, num_rows, vocab_size, dtype, reduction):
    logits, targets, gen = _inputs(num_rows, vocab_size, dtype)
    upstream = torch.randn(num_rows, generator=gen) if reduction == "none" else torch.tensor(1.7)
    got_loss, got_grad = _loss_and_grad(cross_entropy, logits.to(device), targets.to(device), reduction,
                                        upstream.to(device))
    want_loss, want_grad = _loss_and_grad(reference.cross_entropy, logits, targets, reduction, upstream)
    assert got_loss.dtype == torch.float32 and got_grad.dtype == dtype
    torch.testing.assert_close(got_loss.cpu(), want_loss, **LOSS_TOL)
    torch.testing.assert_close(got_grad.cpu(), want_grad, **GRAD_TOL[dtype])
    assert (got_grad.cpu()[targets == IGNORE] == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_torch_functional(device, reduction):
    logits, targets, gen = _inputs(33, 1000, torch.float32, seed=1)
    upstream = torch.randn(33, generator=gen) if reduction == "none" else torch.tensor(1.0)
    got_loss, got_grad = _loss_and_grad(cross_entropy, logits.to(device), targets.to(device), reduction,
                                        upstream.to(device))
    want_loss, want_grad = _loss_and_grad(F.cross_entropy, logits, targets, reduction, upstream)
    torch.testing.assert_close(got_loss.cpu(), want_loss, **LOSS_TOL)
    torch.testing.assert_close(got_grad.cpu(), want_grad, **GRAD_TOL[torch.float32])


def test_reference_chunks_match_unchunked():
    logits, targets, _ = _inputs(33, 37, torch.float32, seed=2)
    for reduction in ("mean", "sum", "none"):
        torch.testing.assert_close(
            reference.cross_entropy(logits, targets, IGNORE, reduction, chunk_rows=4),
            F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction=reduction), rtol=1e-6, atol=1e-6)


def test_poisoned_outputs_are_fully_written(device):
    logits, targets, gen = _inputs(5, 1000, torch.bfloat16, seed=3)
    logits, targets = logits.to(device), targets.to(device)
    loss = torch.full((5,), float("nan"), device=device)
    lse = torch.full((5,), float("nan"), device=device)
    cross_entropy_forward(logits, targets, IGNORE, loss_out=loss, lse_out=lse)
    want_lse = torch.logsumexp(logits.float(), dim=1)
    torch.testing.assert_close(lse, want_lse, **LOSS_TOL)
    torch.testing.assert_close(loss, reference.cross_entropy(logits, targets, IGNORE, "none"), **LOSS_TOL)
    dlogits = torch.full_like(logits, float("nan"))
    grad = torch.randn(5, generator=gen).to(device)
    cross_entropy_backward(logits, targets, lse, grad, IGNORE, out=dlogits)
    assert torch.isfinite(dlogits).all()
    # In place over the logits (the caller's buffer) gives the same gradient.
    in_place = logits.clone()
    cross_entropy_backward(in_place, targets, lse, grad, IGNORE, out=in_place)
    assert torch.equal(in_place, dlogits)


def test_strided_rows_and_edge_targets(device):
    gen = torch.Generator().manual_seed(4)
    wide = torch.randn(6, 50, generator=gen)
    logits = wide[:, :37]  # row stride 50
    targets = torch.tensor([0, 36, IGNORE, 5, IGNORE, 17])
    logits[3, :] = float("-inf")
    logits[3, 5] = 0.0  # a single finite logit: loss 0
    got_loss, got_grad = _loss_and_grad(cross_entropy, logits.to(device), targets.to(device), "mean",
                                        torch.tensor(1.0, device=device))
    want_loss, want_grad = _loss_and_grad(F.cross_entropy, logits, targets, "mean", torch.tensor(1.0))
    torch.testing.assert_close(got_loss.cpu(), want_loss, **LOSS_TOL)
    torch.testing.assert_close(got_grad.cpu(), want_grad, **LOSS_TOL)
    # All rows ignored: "sum" is 0 with a zero gradient, "mean" is NaN as in torch.
    all_ignored = torch.full((6,), IGNORE, device=device)
    loss_sum, grad_sum = _loss_and_grad(cross_entropy, logits.to(device), all_ignored, "sum",
                                        torch.tensor(1.0, device=device))
    assert loss_sum.item() == 0 and (grad_sum == 0).all()
    assert torch.isnan(cross_entropy(logits.to(device), all_ignored)).item()
    # A target outside [0, V) that is not ignore_index yields NaN instead of an out-of-bounds read.
    bad = torch.tensor([0, 37, 1, 2, 3, 4], device=device)
    assert torch.isnan(cross_entropy(logits.to(device), bad, reduction="none")[1]).item()


def test_rejects_bad_inputs():
    logits, targets = torch.randn(4, 9), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(logits, targets, reduction="avg")
    with pytest.raises(ValueError, match="2-D"):
        cross_entropy(logits[0], targets)
    with pytest.raises(ValueError, match="targets"):
        cross_entropy(logits, targets.float())
    with pytest.raises(ValueError, match="contiguous"):
        cross_entropy(torch.randn(9, 4).t(), targets)
