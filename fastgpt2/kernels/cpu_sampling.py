"""CPU top-k / top-p / min-p sampling: the C++ extension (`native._C`, the ISA variant chosen at import) when it is
built and this CPU runs it, else the torch reference.

The compiled module comes through `fastgpt2.kernels.native` (its one importer); `fastgpt2.kernels.dispatch` picks this
module for CPU tensors. Semantics are those of
`fastgpt2.kernels.reference` (sampling section).
"""
from __future__ import annotations

import functools
import warnings

import torch

from fastgpt2.kernels import native, reference

from fastgpt2.kernels.native import _C

HAS_EXTENSION: bool = _C is not None

__all__ = ["HAS_EXTENSION", "argmax", "row_logprobs", "topk_topp_minp_sample", "topk_topp_minp_select"]


@functools.cache
def _warn_no_extension() -> None:
    if native.said_at_import():
        return
    warnings.warn(
        f"fastgpt2's C++ CPU sampler is not in use ({native.why_no_extension()}), so sampling uses the slower torch "
        "reference sampler",
        RuntimeWarning,
        stacklevel=3,
    )


def _check_logits(logits) -> int:
    """Type, shape and device of the logits; returns the number of rows. Values are checked by the extension (or by
    _check_values on the fallback)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a 2-D (batch, vocab) tensor, got {shape}")
    if logits.dtype != torch.float32:
        raise TypeError(f"logits must be float32, got {logits.dtype}; convert them with .float() first")
    if not logits.is_cpu:
        raise ValueError(f"logits must be on the CPU, got {logits.device}; use fastgpt2.kernels.dispatch for CUDA")
    if logits.shape[1] < 1:
        raise ValueError("logits must have a vocab dimension of at least 1 token")
    return logits.shape[0]


def _check_param(name: str, value, num_rows: int, integer: bool) -> None:
    """A (B,) parameter tensor on the CPU: integer for top_k, floating-point for the others."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape ({num_rows},), got {type(value).__name__}")
    if value.shape != (num_rows,):
        raise ValueError(f"{name} must have shape ({num_rows},), one value per logits row, got {tuple(value.shape)}")
    if not value.is_cpu:
        raise ValueError(f"{name} must be on the CPU, got {value.device}")
    if integer and (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
    if not integer and not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")


def _check_values(logits, top_p, min_p, uniform=None) -> None:
    """The checks the extension makes, for the torch fallback (same messages)."""
    for name, value, ok, allowed in (
        ("top_p", top_p, (top_p > 0) & (top_p <= 1), "(0, 1]"),
        ("min_p", min_p, (min_p >= 0) & (min_p <= 1), "[0, 1]"),
        ("uniform", uniform, None if uniform is None else (uniform >= 0) & (uniform < 1), "[0, 1)"),
    ):
        if ok is not None and not bool(ok.all()):
            row = int((~ok).nonzero()[0])
            raise ValueError(f"{name}[{row}] = {float(value[row])} is outside {allowed}; clamp it in the sampling parameters")
    for problem, rows in (
        ("contains NaN; the model output is corrupt or the penalties produced NaN", torch.isnan(logits).any(dim=1)),
        ("contains +inf, for which softmax is undefined; clamp or fix the logits", torch.isposinf(logits).any(dim=1)),
        ("is -inf everywhere, so every token is banned; allow at least one token", torch.isneginf(logits).all(dim=1)),
    ):
        if bool(rows.any()):
            raise ValueError(f"logits row {int(rows.nonzero()[0])} {problem}")


_Tensor = torch.Tensor
_FLOAT32 = torch.float32
_INTEGER_DTYPES = frozenset({torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8})
_FLOATING_DTYPES = frozenset({torch.float64, torch.float32, torch.float16, torch.bfloat16})


def _plain_call(logits, top_k, top_p, min_p, uniform) -> bool:
    """True for the usual inputs, which need none of the checks' messages and no copy: plain CPU tensors, contiguous
    (B, V) float32 logits with V >= 1, (B,) parameters of the accepted dtypes. Anything else takes the checked path."""
    if not (type(logits) is _Tensor and logits.dtype is _FLOAT32 and logits.is_cpu and logits.dim() == 2
            and logits.is_contiguous()):
        return False
    num_rows, vocab_size = logits.shape
    shape = (num_rows,)
    return (vocab_size >= 1 and type(top_k) is _Tensor and top_k.dtype in _INTEGER_DTYPES and top_k.is_cpu
            and top_k.shape == shape and type(top_p) is _Tensor and top_p.dtype in _FLOATING_DTYPES and top_p.is_cpu
            and top_p.shape == shape and type(min_p) is _Tensor and min_p.dtype in _FLOATING_DTYPES
            and min_p.is_cpu and min_p.shape == shape and type(uniform) is _Tensor
            and uniform.dtype in _FLOATING_DTYPES and uniform.is_cpu and uniform.shape == shape)


def _threads(num_threads: int | None) -> int:
    return torch.get_num_threads() if num_threads is None else num_threads


def argmax(logits: torch.Tensor, *, num_threads: int | None = None) -> torch.Tensor:
    """Greedy decoding's torch.argmax(logits, dim=-1), the same indices: per row the first index of its largest value,
    or of its first NaN. (B, V) float32 CPU logits with a contiguous vocab dimension go to the C++ kernel (vectorised,
    rows over up to num_threads threads, default torch.get_num_threads()); anything else, or no extension, to torch.
    Returns a (B,) int64 tensor."""
    if (_C is None or type(logits) is not _Tensor or logits.dtype is not _FLOAT32 or not logits.is_cpu
            or logits.dim() != 2 or logits.shape[1] < 1 or logits.stride(1) != 1
            or (logits.shape[0] > 1 and logits.stride(0) < logits.shape[1])):
        return torch.argmax(logits, dim=-1)
    num_rows, vocab_size = logits.shape
    out = torch.empty(num_rows, dtype=torch.int64)
    _C._argmax_rows_raw(logits.data_ptr(), num_rows, vocab_size, logits.stride(0), out.data_ptr(),
                        _threads(num_threads))
    return out


def row_logprobs(logits: torch.Tensor, targets: list[int] | None, top_n: int, *, rows: list[int] | None = None,
                 num_threads: int | None = None):
    """The logprobs the engine reports, without a (R, V) log_softmax: per row of (B, V) float32 CPU logits (or per
    row listed in `rows`, in that order), the logprob of targets[i] (a token id, or -1 for none: NaN) and the top_n
    tokens with theirs.

    C++ when built (csrc/logprobs.h: the log-sum-exp in float64, each logprob one float32 rounding of x - lse; top-N
    ties to the smaller id; rows over up to num_threads threads, default torch.get_num_threads()); the torch
    reference (log_softmax, gather, topk) without the extension or where a row holds NaN or +inf or is -inf
    everywhere.

    Returns (target logprobs: R floats, or None when targets is None; top ids: R lists of top_n ints; top logprobs: R
    lists of top_n floats, descending), R = len(rows) or B.
    """
    logits_rows = _check_logits(logits)
    num_rows = logits_rows if rows is None else len(rows)
    vocab_size = logits.shape[1]
    if targets is not None and len(targets) != num_rows:
        raise ValueError(f"targets must have one token id per logits row ({num_rows}), got {len(targets)}")
    if _C is not None:
        logits = _vocab_contiguous(logits.detach())
        result = _C._logprob_rows_raw(logits.data_ptr(), logits_rows, vocab_size, logits.stride(0),
                                      [] if rows is None else rows, [] if targets is None else targets, top_n,
                                      _threads(num_threads))
        if result is not None:
            target_logprobs, top_ids, top_logprobs = result
            return (None if targets is None else target_logprobs), top_ids, top_logprobs
    else:  # the extension's checks, for the torch fallback (same messages)
        _warn_no_extension()
        if not 0 <= top_n <= vocab_size:
            raise ValueError(f"the number of top logprobs must be in [0, {vocab_size}], got {top_n}")
        for row in rows or []:
            if not 0 <= row < logits_rows:
                raise ValueError(f"row {row} is outside the logits' {logits_rows} rows")
        for i, t in enumerate(targets or []):
            if not -1 <= t < vocab_size:
                raise ValueError(f"target token id {t} (row {i}) is outside the vocabulary [0, {vocab_size})")
    return reference.row_logprobs(logits, targets, top_n, rows)


def topk_topp_minp_sample(
    logits: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    uniform: torch.Tensor,
    *,
    num_threads: int | None = None,
) -> torch.Tensor:
    """Truncate each row (top-k -> top-p -> min-p) and draw one token with the given uniform.

    Ranks are (probability descending, token id ascending): tied probabilities, which equal logits always give, are
    broken by the smaller token id. Tokens with probability 0 (-inf logits) are never kept. The draw is the smallest
    kept token id whose running kept probability in token-id order exceeds uniform * (kept probability).

    Parameters
    ----------
    logits : (B, V) float32 CPU tensor, temperature already applied; -inf bans a token. The vocab dimension is used
        in place when it is contiguous.
    top_k : (B,) integer tensor; <= 0 or >= V disables top-k.
    top_p : (B,) floating tensor in (0, 1]; 1 disables top-p.
    min_p : (B,) floating tensor in [0, 1]; 0 disables min-p.
    uniform : (B,) floating tensor in [0, 1), one draw per row.
    num_threads : rows are split over this many threads (default: torch.get_num_threads()).

    Returns
    -------
    (B,) int64 tensor of token ids.
    """
    # The common call is checked in one expression (the sampler's per-call overhead is part of its per-row time);
    # anything else gets the checks that name the problem.
    if _C is None or not _plain_call(logits, top_k, top_p, min_p, uniform):
        num_rows = _check_logits(logits)
        _check_param("top_k", top_k, num_rows, True)
        _check_param("top_p", top_p, num_rows, False)
        _check_param("min_p", min_p, num_rows, False)
        _check_param("uniform", uniform, num_rows, False)
        if _C is None:
            _warn_no_extension()
            _check_values(logits, top_p, min_p, uniform)
            return reference.topk_topp_minp_sample(logits, top_k, top_p, min_p, uniform)
        logits = _vocab_contiguous(logits)
    # The checked tensors go to the extension as addresses and lists: four numpy conversions would cost ~15 us.
    num_rows, vocab_size = logits.shape
    out = torch.empty(num_rows, dtype=torch.int64)
    _C._topk_topp_minp_sample_raw(logits.data_ptr(), num_rows, vocab_size, logits.stride(0), top_k.tolist(),
                                  top_p.tolist(), min_p.tolist(), uniform.tolist(), out.data_ptr(),
                                  _threads(num_threads))
    return out


def topk_topp_minp_select(
    logits: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    *,
    num_threads: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The candidates each row keeps after top-k -> top-p -> min-p, with their renormalised probabilities.

    Same inputs and tie-breaking as `topk_topp_minp_sample`, without the uniform.

    Returns
    -------
    ids : (B, N) int64, the kept token ids of each row in ascending order, padded with -1; N = counts.max().
    probs : (B, N) float32, their probabilities renormalised over the kept set (each row sums to 1), padded with 0.
    counts : (B,) int64, kept tokens per row (>= 1).
    """
    num_rows = _check_logits(logits)
    _check_param("top_k", top_k, num_rows, True)
    _check_param("top_p", top_p, num_rows, False)
    _check_param("min_p", min_p, num_rows, False)
    if _C is None:
        _warn_no_extension()
        _check_values(logits, top_p, min_p)
        return _select_reference(logits, top_k, top_p, min_p)
    ids, probs, counts = _C.topk_topp_minp_select(_logits_array(logits), _vector(top_k, True), _vector(top_p, False),
                                                  _vector(min_p, False), _threads(num_threads))
    return torch.from_numpy(ids), torch.from_numpy(probs), torch.from_numpy(counts)


def _vocab_contiguous(logits: torch.Tensor) -> torch.Tensor:
    """The logits themselves when the vocab dimension is contiguous and rows do not overlap (rows may be strided),
    else a contiguous copy."""
    num_rows, vocab_size = logits.shape
    if (vocab_size > 1 and logits.stride(1) != 1) or (num_rows > 1 and logits.stride(0) < vocab_size):
        logits = logits.contiguous()
    return logits


def _logits_array(logits: torch.Tensor):
    """A zero-copy numpy view of the logits when the vocab dimension is contiguous (rows may be strided)."""
    return _vocab_contiguous(logits.detach()).numpy()


def _vector(t: torch.Tensor, integer: bool):
    """A (B,) parameter as numpy: int64/int32 or float64/float32 as given (the extension widens them exactly)."""
    if t.requires_grad:
        t = t.detach()
    if integer and t.dtype not in (torch.int64, torch.int32):
        t = t.to(torch.int64)
    elif not integer and t.dtype not in (torch.float64, torch.float32):
        t = t.to(torch.float64)
    return (t if t.is_contiguous() else t.contiguous()).numpy()


def _select_reference(logits, top_k, top_p, min_p):
    """topk_topp_minp_select on the torch reference."""
    probs = torch.softmax(logits.double(), dim=-1)  # (B, V) float64
    mask = reference.sampling_mask(logits, top_k, top_p, min_p) & (probs > 0)  # (B, V); p == 0 is never kept
    num_rows, vocab_size = logits.shape
    counts = mask.sum(dim=1)  # (B,)
    max_count = int(counts.max()) if num_rows else 0
    token_ids = torch.arange(vocab_size).expand(num_rows, vocab_size)
    ids = torch.sort(torch.where(mask, token_ids, vocab_size), dim=1).values[:, :max_count]  # (B, N) kept ids first
    kept = ids < vocab_size
    kept_probs = torch.where(kept, torch.gather(probs, 1, ids.clamp_max(vocab_size - 1)), 0.0)
    kept_probs = kept_probs / kept_probs.sum(dim=1, keepdim=True)
    return torch.where(kept, ids, -1), kept_probs.float(), counts
