"""Triton fused sampler vs reference.topk_topp_minp_sample: exact ids on fixed noise, frequencies over many draws."""
import os

import pytest
import torch

from fastgpt2.kernels import reference
from fastgpt2.kernels.sampling import seeded_uniform, topk_topp_minp_sample, topk_topp_minp_sample_seeded

INF = float("inf")


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if request.param == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1")
    return torch.device(request.param)


def _random_params(num_rows: int, vocab_size: int, gen: torch.Generator):
    """Mixed per-row settings: each of top-k / top-p / min-p on in about half the rows, edge values included."""
    top_k = torch.randint(1, vocab_size + 1, (num_rows,), generator=gen)
    k_mode = torch.randint(0, 4, (num_rows,), generator=gen)
    top_k = torch.where(k_mode == 0, torch.zeros_like(top_k), top_k)  # off
    top_k = torch.where(k_mode == 1, torch.full_like(top_k, vocab_size + 3), top_k)  # > V: off
    top_p = 0.05 + 0.95 * torch.rand(num_rows, generator=gen)
    top_p = torch.where(torch.rand(num_rows, generator=gen) < 0.4, torch.ones_like(top_p), top_p)
    min_p = 0.3 * torch.rand(num_rows, generator=gen)
    min_p = torch.where(torch.rand(num_rows, generator=gen) < 0.5, torch.zeros_like(min_p), min_p)
    return top_k, top_p, min_p


def _run(device, logits, top_k, top_p, min_p, uniform):
    """Kernel ids (into a poisoned buffer) and reference ids, both on the CPU."""
    out = torch.full((logits.shape[0],), -7, dtype=torch.int64, device=device)
    args = [t.to(device) for t in (logits, top_k, top_p, min_p, uniform)]
    got = topk_topp_minp_sample(*args, out=out).cpu()
    want = reference.topk_topp_minp_sample(logits, top_k, top_p, min_p, uniform)
    return got, want


@pytest.mark.parametrize("num_rows,vocab_size,dtype", [
    (1, 1, torch.float32), (3, 37, torch.float32), (7, 37, torch.bfloat16), (7, 1000, torch.float32),
    (3, 1000, torch.float16), (2, 50257, torch.float32),
])
def test_matches_reference_random(device, num_rows, vocab_size, dtype):
    gen = torch.Generator().manual_seed(num_rows * 100003 + vocab_size)
    # Several draws of each row so the inverse-CDF step sees many targets.
    logits = (3.0 * torch.randn(num_rows, vocab_size, generator=gen)).to(dtype).repeat(4, 1)
    logits[1::5, : vocab_size // 3] = -INF  # banned tokens, never the whole row
    top_k, top_p, min_p = _random_params(logits.shape[0], vocab_size, gen)
    uniform = torch.rand(logits.shape[0], generator=gen)
    got, want = _run(device, logits, top_k, top_p, min_p, uniform)
    assert torch.equal(got, want)


def _adversarial_rows(vocab_size: int = 16) -> torch.Tensor:
    """Rows whose top-p cuts fall exactly on tie masses, with probabilities that are exact in float32 and float64
    whatever exp's last-ulp rounding on this CPU: 2^n equal logits among -inf, or a tie group of 8 at the maximum
    (exp(0) = 1) over a lower group 40 below it, whose total mass 8 e^-40 ~ 3e-17 vanishes against 8 in either
    precision (with the lower group at 0.0 below 1.0, p = 1 / (8 + 8 / e) is rounded, and whether 6/8 of the kept
    mass reaches top_p = 0.75 depended on the CPU's exp)."""
    rows = [
        torch.zeros(vocab_size),  # all tied, p = 1/16
        torch.where(torch.arange(vocab_size) % 4 == 1, 0.0, -INF),  # 4 tied finite tokens among -inf
        torch.where(torch.arange(vocab_size) == 11, 2.5, -INF),  # a single finite logit
        torch.where(torch.arange(vocab_size) % 2 == 0, 0.0, -0.0),  # +0.0 and -0.0 must tie
        torch.where(torch.arange(vocab_size) < 8, 1.0, -39.0).flip(0),  # two tie groups, the higher one at the end
        torch.tensor([3.0, -INF, 3.0, 3.0, -INF, 3.0, -INF, -INF] * (vocab_size // 8)),  # 8 ties among -inf
    ]
    return torch.stack(rows)


def test_matches_reference_adversarial(device):
    base = _adversarial_rows()
    vocab_size = base.shape[1]
    # Every row against a grid of settings whose top-p boundaries land exactly on the tie masses.
    settings = [(k, p, m) for k in (0, 1, 3, 8, vocab_size, vocab_size + 5) for p in (1.0, 0.25, 0.5, 0.75, 0.3)
                for m in (0.0, 1.0)]
    uniforms = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0 - 2**-24])
    logits, top_k, top_p, min_p, uniform = [], [], [], [], []
    for row in base:
        for k, p, m in settings:
            for u in uniforms:
                logits.append(row)
                top_k.append(k), top_p.append(p), min_p.append(m), uniform.append(u)
    logits = torch.stack(logits)
    got, want = _run(device, logits, torch.tensor(top_k), torch.tensor(top_p), torch.tensor(min_p),
                     torch.stack(uniform))
    assert torch.equal(got, want)
    assert torch.isfinite(logits.gather(1, got[:, None])).all()  # -inf logits are never drawn


def test_non_contiguous_rows(device):
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 5, 37, generator=gen)
    logits = hidden[:, -1, :]  # (B, V) with row stride 5 * 37, as sliced from the model's last position
    top_k, top_p, min_p = _random_params(4, 37, gen)
    uniform = torch.rand(4, generator=gen)
    args = [t.to(device) for t in (top_k, top_p, min_p, uniform)]
    got = topk_topp_minp_sample(hidden.to(device)[:, -1, :], *args)
    assert torch.equal(got.cpu(), reference.topk_topp_minp_sample(logits, top_k, top_p, min_p, uniform))


def test_seeded_matches_reference_and_ignores_batch_position(device):
    gen = torch.Generator().manual_seed(5)
    num_rows, vocab_size = 7, 37
    logits = 2.0 * torch.randn(num_rows, vocab_size, generator=gen)
    top_k, top_p, min_p = _random_params(num_rows, vocab_size, gen)
    seeds = torch.randint(0, 2**62, (num_rows,), generator=gen)
    offsets = torch.randint(0, 2**40, (num_rows,), generator=gen)
    to = lambda *ts: [t.to(device) for t in ts]  # noqa: E731
    uniform = seeded_uniform(*to(seeds, offsets)).cpu()
    assert uniform.dtype == torch.float32 and ((uniform >= 0) & (uniform < 1)).all()
    assert uniform.unique().numel() == num_rows
    out = torch.full((num_rows,), -7, dtype=torch.int64, device=device)
    got = topk_topp_minp_sample_seeded(*to(logits, top_k, top_p, min_p, seeds, offsets), out=out).cpu()
    assert torch.equal(got, reference.topk_topp_minp_sample(logits, top_k, top_p, min_p, uniform))
    # The same (seed, offset) gives the same id wherever its row sits in the batch.
    perm = torch.randperm(num_rows, generator=gen)
    got_perm = topk_topp_minp_sample_seeded(
        *to(logits[perm], top_k[perm], top_p[perm], min_p[perm], seeds[perm], offsets[perm])).cpu()
    assert torch.equal(got_perm, got[perm])
    assert torch.equal(seeded_uniform(*to(seeds[perm], offsets[perm])).cpu(), uniform[perm])


def _chi_square_pvalue(counts: torch.Tensor, expected: torch.Tensor) -> float:
    stat = ((counts - expected) ** 2 / expected).sum()
    dof = torch.tensor(float(expected.numel() - 1), dtype=torch.float64)
    return torch.special.gammaincc(dof / 2, stat / 2).item()


@pytest.mark.parametrize("top_k,top_p,min_p", [(0, 1.0, 0.0), (8, 1.0, 0.0), (0, 0.7, 0.0), (10, 0.85, 0.08)])
def test_frequencies_match_renormalised_reference(device, top_k, top_p, min_p):
    num_draws, vocab_size = 4000, 12
    gen = torch.Generator().manual_seed(11)
    row = 1.2 * torch.randn(vocab_size, generator=gen)
    row[3] = row[7] = row[5]  # a tie group, cut by top-k or top-p in some settings
    row[9] = -INF
    logits = row.expand(num_draws, vocab_size).contiguous()
    top_k_t = torch.full((num_draws,), top_k)
    top_p_t, min_p_t = torch.full((num_draws,), top_p), torch.full((num_draws,), min_p)
    seeds, offsets = torch.full((num_draws,), 1234), torch.arange(num_draws)
    ids = topk_topp_minp_sample_seeded(*[t.to(device) for t in (logits, top_k_t, top_p_t, min_p_t, seeds, offsets)])
    counts = torch.bincount(ids.cpu(), minlength=vocab_size).double()

    mask = reference.sampling_mask(logits[:1], top_k_t[:1], top_p_t[:1], min_p_t[:1])[0]
    probs = torch.softmax(row.double(), dim=0) * mask
    probs /= probs.sum()
    assert counts[probs == 0].sum() == 0, "a truncated or banned token was drawn"
    kept = (probs > 0).nonzero().squeeze(1)
    if kept.numel() > 1:
        assert _chi_square_pvalue(counts[kept], num_draws * probs[kept]) > 1e-3
    cosine = torch.nn.functional.cosine_similarity(counts / num_draws, probs, dim=0)
    assert cosine > 0.99


def test_rejects_bad_inputs():
    logits = torch.randn(2, 5)
    ok = (torch.zeros(2, dtype=torch.long), torch.ones(2), torch.zeros(2), torch.rand(2))
    with pytest.raises(ValueError, match="2-D"):
        topk_topp_minp_sample(logits[0], *ok)
    with pytest.raises(ValueError, match="top_k must have shape"):
        topk_topp_minp_sample(logits, torch.zeros(3, dtype=torch.long), *ok[1:])
    with pytest.raises(ValueError, match="integer"):
        topk_topp_minp_sample(logits, torch.zeros(2), *ok[1:])
    with pytest.raises(ValueError, match="contiguous"):
        topk_topp_minp_sample(torch.randn(5, 2).t(), *ok)
