"""Comparing seeded samples that were computed along two arithmetic paths (a prefill GEMM against a prefix-cache hit
or a recomputation after preemption). On the CPU engine's C++ step that arithmetic is the same for every batch shape
(a contract: tests/test_batch_invariance.py), so there the samples must be equal: assert_same_seeded_samples. The
torch path (FASTGPT2_NATIVE_DECODE=0, CUDA) makes no such promise: its logits differ by float32 rounding, so a draw
whose uniform lands within rounding of a boundary between two tokens may pick either. Such a pair is compared up to
its first differing token, and that token pair must be explained by the float64 reference: both tokens kept, and the
step's uniform within `tol` of probability mass of both tokens' intervals of the inverse CDF. A real bug (a wrong row,
a wrong uniform, a lost penalty) draws tokens that are far apart and fails."""
from __future__ import annotations

import torch

from fastgpt2.kernels import reference


def assert_same_or_rounding_flip(got: list[int], want: list[int], hf_model, prompt: list[int], params,
                                 index: int = 0, tol: float = 1e-4) -> int:
    """Returns the number of tokens compared exactly (len(want) when the two agree). params: temperature, top_k,
    top_p, min_p and seed are honoured (no penalties, bias or processors); index: the sample's index in its request
    (its generator is seeded with seed + index, as the engine does)."""
    assert len(got) == len(want), f"lengths differ: {len(got)} vs {len(want)}"
    step = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if step is None:
        return len(want)
    generator = torch.Generator().manual_seed(params.seed + index)
    uniform = [torch.rand((), dtype=torch.float64, generator=generator) for _ in range(step + 1)][step]
    with torch.no_grad():
        ids = torch.tensor([prompt + want[:step]])
        logits = hf_model.double()(ids).logits[0, -1:] / params.temperature  # (1, V) float64
    mask = reference.sampling_mask(logits, torch.tensor([params.top_k]), torch.tensor([params.top_p]),
                                   torch.tensor([params.min_p]))[0]
    probs = torch.softmax(logits[0], dim=-1) * mask  # (V,) float64, zero outside the kept set
    cum = torch.cumsum(probs, dim=0)
    target = uniform * cum[-1]
    for token in (got[step], want[step]):
        assert mask[token], f"step {step}: token {token} is outside the reference's kept set"
        lo, hi = cum[token] - probs[token], cum[token]
        distance = max(lo - target, target - hi, 0.0)
        assert distance <= tol * cum[-1], (
            f"step {step}: tokens {got[step]} and {want[step]} differ by more than rounding (token {token}'s interval "
            f"[{lo:.6g}, {hi:.6g}] is {distance:.3g} of mass away from the draw at {target:.6g})")
    return step


def assert_same_seeded_samples(llm, got: list[int], want: list[int], hf_model, prompt: list[int], params,
                               index: int = 0) -> None:
    """Bitwise-equal tokens where llm runs the C++ step (batch-invariant); else equal up to a rounding flip."""
    if llm.engine.runner.cpu_step is not None:
        assert got == want
    else:
        assert_same_or_rounding_flip(got, want, hf_model, prompt, params, index)
