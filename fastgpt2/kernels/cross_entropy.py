"""Fused cross-entropy over a large vocabulary in Triton: online-logsumexp forward, softmax-minus-onehot backward.

Never materialises float32 probabilities for the batch: each program streams one row in BLOCK-sized chunks.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["vocab_size", "ignore_index"])
def _cross_entropy_fwd_kernel(
    logits_ptr, targets_ptr, loss_ptr, lse_ptr,
    vocab_size, stride_row, ignore_index,
    BLOCK: tl.constexpr,
):
    # read V + 1 logits and 1 target per row ; write 2 float32 per row
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK)
    # Per-lane online logsumexp; one cross-lane reduction at the end instead of one per chunk.
    lane_max = tl.full((BLOCK,), float("-inf"), tl.float32)
    lane_sum = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, vocab_size, BLOCK):
        idx = start + cols
        x = tl.load(row_ptr + idx, mask=idx < vocab_size, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(lane_max, x)
        safe_max = tl.where(new_max > float("-inf"), new_max, 0.0)  # all -inf so far: keep the sum at 0, not NaN
        lane_sum = lane_sum * tl.exp(lane_max - safe_max) + tl.exp(x - safe_max)
        lane_max = new_max
    row_max = tl.max(lane_max, axis=0)
    safe_row_max = tl.where(row_max > float("-inf"), row_max, 0.0)
    lse = safe_row_max + tl.log(tl.sum(lane_sum * tl.exp(lane_max - safe_row_max), axis=0))

    target = tl.load(targets_ptr + row)
    in_range = (target >= 0) & (target < vocab_size)
    target_logit = tl.load(row_ptr + tl.where(in_range, target, 0)).to(tl.float32)
    # An out-of-range target (other than ignore_index) gives NaN instead of reading out of bounds.
    loss = tl.where(in_range, lse - target_logit, float("nan"))
    loss = tl.where(target == ignore_index, 0.0, loss)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)


@triton.jit(do_not_specialize=["vocab_size", "ignore_index"])
def _cross_entropy_bwd_kernel(
    logits_ptr, targets_ptr, lse_ptr, grad_ptr, dlogits_ptr,
    vocab_size, stride_row, stride_grad, stride_drow, ignore_index,
    BLOCK: tl.constexpr,
):
    # read V logits + 3 scalars per row ; write V gradients (logits dtype) per row
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    target = tl.load(targets_ptr + row)
    lse = tl.load(lse_ptr + row)
    grad = tl.load(grad_ptr + row * stride_grad).to(tl.float32)  # stride_grad = 0 for a shared scalar
    grad = tl.where(target == ignore_index, 0.0, grad)
    for start in range(0, vocab_size, BLOCK):
        idx = start + cols
        valid = idx < vocab_size
        x = tl.load(logits_ptr + row * stride_row + idx, mask=valid, other=float("-inf")).to(tl.float32)
        dx = (tl.exp(x - lse) - (idx == target).to(tl.float32)) * grad
        tl.store(dlogits_ptr + row * stride_drow + idx, dx.to(dlogits_ptr.dtype.element_ty), mask=valid)


def _block_and_warps(vocab_size: int, device: torch.device) -> tuple[int, int]:
    # 4096 floats per chunk on GPU (13 chunks for 50257, 16 values per thread with 8 warps); the CPU interpreter pays
    # per op rather than per element, so it takes the whole row.
    cap = 4096 if device.type == "cuda" else 65536
    block = min(cap, triton.next_power_of_2(vocab_size))
    return block, (8 if block >= 2048 else 4)


def _check(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be 2-D (N, V) with V > 0, got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    if logits.stride(1) != 1:
        raise ValueError("logits must be contiguous along the vocab dimension; call .contiguous() first")
    if targets.shape != (logits.shape[0],) or targets.dtype.is_floating_point:
        raise ValueError(f"targets must be an integer ({logits.shape[0]},) tensor, got {targets.dtype} "
                         f"of shape {tuple(targets.shape)}")
    if targets.device != logits.device:
        raise ValueError(f"targets are on {targets.device} but logits are on {logits.device}; move them together")


def cross_entropy_forward(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
    *, loss_out: torch.Tensor | None = None, lse_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss and logsumexp.

    logits : (N, V) float32/float16/bfloat16, unit stride along V. targets : (N,) integer.
    Returns (loss, lse), both (N,) float32; loss is 0 where targets == ignore_index and NaN for other targets
    outside [0, V).
    """
    _check(logits, targets)
    num_rows, vocab_size = logits.shape
    targets = targets.contiguous()
    loss = torch.empty(num_rows, dtype=torch.float32, device=logits.device) if loss_out is None else loss_out
    lse = torch.empty(num_rows, dtype=torch.float32, device=logits.device) if lse_out is None else lse_out
    for name, t in (("loss_out", loss), ("lse_out", lse)):
        if t.shape != (num_rows,) or t.dtype != torch.float32 or t.device != logits.device or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous ({num_rows},) float32 tensor on {logits.device}")
    if num_rows > 0:
        block, num_warps = _block_and_warps(vocab_size, logits.device)
        _cross_entropy_fwd_kernel[(num_rows,)](
            logits, targets, loss, lse, vocab_size, logits.stride(0), ignore_index, BLOCK=block, num_warps=num_warps)
    return loss, lse


def cross_entropy_backward(
    logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor, ignore_index: int = -100,
    *, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """dlogits = (softmax(logits) - onehot(targets)) * grad, zero on ignored rows.

    lse : (N,) float32 from `cross_entropy_forward`. grad : (N,) per-row float or a one-element tensor shared by all
    rows. out : optional (N, V) buffer of the logits' dtype, unit stride along V (may alias `logits`: each element is
    read before it is written). Returns out.
    """
    _check(logits, targets)
    num_rows, vocab_size = logits.shape
    if grad.numel() == 1:
        grad, stride_grad = grad.reshape(1).float(), 0
    elif grad.shape == (num_rows,):
        grad = grad.float()
        stride_grad = grad.stride(0)
    else:
        raise ValueError(f"grad must have one element or shape ({num_rows},), got {tuple(grad.shape)}")
    if out is None:
        out = torch.empty((num_rows, vocab_size), dtype=logits.dtype, device=logits.device)
    if out.shape != logits.shape or out.dtype != logits.dtype or out.device != logits.device or out.stride(1) != 1:
        raise ValueError(f"out must be a {tuple(logits.shape)} {logits.dtype} tensor on {logits.device} "
                         "with unit stride along V")
    if num_rows > 0:
        block, num_warps = _block_and_warps(vocab_size, logits.device)
        _cross_entropy_bwd_kernel[(num_rows,)](
            logits, targets.contiguous(), lse, grad, out,
            vocab_size, logits.stride(0), stride_grad, out.stride(0), ignore_index, BLOCK=block, num_warps=num_warps)
    return out


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index, reduction):
        loss, lse = cross_entropy_forward(logits, targets, ignore_index)
        num_valid = (targets != ignore_index).sum()  # stays on device: no host sync
        ctx.save_for_backward(logits, targets, lse, num_valid)
        ctx.ignore_index, ctx.reduction = ignore_index, reduction
        if reduction == "none":
            return loss
        if reduction == "sum":
            return loss.sum()
        return loss.sum() / num_valid

    @staticmethod
    def backward(ctx, grad_output):
        logits, targets, lse, num_valid = ctx.saved_tensors
        grad = grad_output / num_valid if ctx.reduction == "mean" else grad_output
        dlogits = cross_entropy_backward(logits, targets, lse, grad, ctx.ignore_index)
        return dlogits, None, None, None


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of `logits` against `targets`, differentiable in `logits`.

    Parameters
    ----------
    logits : (N, V) float32/float16/bfloat16, unit stride along V.
    targets : (N,) int64; rows equal to `ignore_index` add 0 loss and get 0 gradient.
    reduction : "mean" (over non-ignored rows; NaN when all are ignored), "sum" or "none".

    Returns
    -------
    float32 loss: a scalar, or (N,) for reduction="none". The gradient has the logits' dtype.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return _CrossEntropy.apply(logits, targets, ignore_index, reduction)
