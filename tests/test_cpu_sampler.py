"""CPU sampler (fastgpt2.kernels.cpu_sampling, C++ extension native._C) against the torch reference: exact kept sets and
draws on random and adversarial logits, input errors, the torch fallback, and token frequencies over many draws."""
import math
import re
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastgpt2.kernels import cpu_sampling as cpu_sampler
from fastgpt2.kernels import reference

needs_extension = pytest.mark.skipif(not cpu_sampler.HAS_EXTENSION, reason="the C++ extension is not in use")
NEG_INF = float("-inf")


def kept_mask(logits, top_k, top_p, min_p, num_threads=None):
    """(B, V) bool mask from topk_topp_minp_select, after checking its layout."""
    ids, probs, counts = cpu_sampler.topk_topp_minp_select(logits, top_k, top_p, min_p, num_threads=num_threads)
    num_rows, vocab_size = logits.shape
    assert ids.dtype == torch.int64 and probs.dtype == torch.float32 and counts.dtype == torch.int64
    assert ids.shape == probs.shape == (num_rows, int(counts.max())) and bool((counts >= 1).all())
    valid = torch.arange(ids.shape[1])[None, :] < counts[:, None]  # (B, N)
    assert bool((ids[~valid] == -1).all()) and bool((probs[~valid] == 0).all()), "padding must be -1 / 0"
    assert bool((ids[:, 1:] > ids[:, :-1])[valid[:, 1:]].all()), "ids must ascend"
    torch.testing.assert_close(probs.double().sum(dim=1), torch.ones(num_rows, dtype=torch.float64), rtol=0, atol=1e-5)
    mask = torch.zeros(num_rows, vocab_size, dtype=torch.bool)
    rows = torch.arange(num_rows)[:, None].expand_as(ids)
    mask[rows[valid], ids[valid]] = True
    return mask


def assert_matches_reference(logits, top_k, top_p, min_p, seed=0):
    """Same kept set as reference.sampling_mask and the same draws for the same uniforms.

    At top_p = 1 the reference compares its cumsum with its sum, which differ by rounding only: it then keeps or drops
    the tokens of the tail at random when p == 0 (-inf logits) or p < ~1e-15 of the total. The extension keeps the
    whole top-k set minus the p == 0 tokens, so those tokens are left out of the comparison (never the kept p > 0
    tokens of any row with top_p < 1).
    """
    probs = torch.softmax(logits.double(), dim=-1)  # (B, V)
    expected = reference.sampling_mask(logits, top_k, top_p, min_p) & (probs > 0)
    mask = kept_mask(logits, top_k, top_p, min_p)
    rounding_only = (top_p[:, None] >= 1.0) & (probs < 1e-12 * probs.sum(dim=-1, keepdim=True))
    assert not bool((mask & (probs == 0)).any()), "a token with p == 0 was kept"
    mismatched = ((mask != expected) & ~rounding_only).any(dim=1).nonzero().flatten().tolist()
    assert not mismatched, f"kept sets differ in rows {mismatched[:8]}"
    uniform = torch.rand(logits.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    drawn = cpu_sampler.topk_topp_minp_sample(logits, top_k, top_p, min_p, uniform)
    assert drawn.dtype == torch.int64
    assert torch.equal(drawn, reference.topk_topp_minp_sample(logits, top_k, top_p, min_p, uniform))
    assert bool(mask.gather(1, drawn[:, None]).all())


def random_params(num_rows, vocab_size, g):
    """A random mix per row: top-k off / small / larger than the vocab, top-p off or in (0, 1), min-p off or on."""
    top_k = torch.randint(1, min(vocab_size, 64) + 1, (num_rows,), generator=g)
    choice = torch.randint(0, 4, (num_rows,), generator=g)
    top_k = torch.where(choice == 0, 0, top_k)
    top_k = torch.where(choice == 1, vocab_size + 5, top_k)
    top_k = torch.where(choice == 2, -1, top_k)
    top_k[0] = 0
    top_p = torch.rand(num_rows, generator=g).clamp_min(0.02)
    top_p = torch.where(torch.rand(num_rows, generator=g) < 0.3, 1.0, top_p)
    top_p[0] = 0.9
    min_p = torch.rand(num_rows, generator=g) * 0.3
    min_p = torch.where(torch.rand(num_rows, generator=g) < 0.5, 0.0, min_p)
    min_p[0] = 0.0
    return top_k, top_p, min_p


@pytest.mark.isa_variants
@needs_extension
@pytest.mark.parametrize("shape, scale", [((64, 50257), 1.0), ((16, 50257), 3.0), ((3, 1000), 1.0), ((3, 1000), 3.0),
                                          ((1, 7), 1.0), ((1, 7), 3.0), ((5, 1), 1.0), ((9, 4099), 2.0)])
def test_random_logits_match_reference(shape, scale):
    g = torch.Generator().manual_seed(shape[0] * 7 + shape[1])
    logits = torch.randn(shape, generator=g) * scale  # (B, V) float32
    assert_matches_reference(logits, *random_params(*shape, g), seed=shape[1])


def adversarial_logits(kind, num_rows, vocab_size, g):
    logits = torch.randn(num_rows, vocab_size, generator=g) * 2
    if kind == "rounded":  # many exact ties
        return logits.round(decimals=1)
    if kind == "integers":  # huge tie groups
        return torch.randint(-3, 3, (num_rows, vocab_size), generator=g).float()
    if kind == "all_equal":
        return torch.zeros(num_rows, vocab_size) + torch.randn(num_rows, 1, generator=g)
    if kind == "banned":  # -inf entries, one finite token at least
        logits[torch.rand(num_rows, vocab_size, generator=g) < 0.6] = NEG_INF
        logits[:, vocab_size // 2] = 0.0
        return logits
    if kind == "single_finite":
        logits.fill_(NEG_INF)
        logits[torch.arange(num_rows), torch.randint(0, vocab_size, (num_rows,), generator=g)] = 1.5
        return logits
    if kind == "peaked":  # three tokens hold almost all the mass
        logits[:, :3] += 12.0
        return logits
    if kind == "wide":  # max - min far beyond the histogram's 64: many tokens with p > 0 in its tiny bucket
        return logits * 40
    if kind == "offset":  # large logits: max - x is rounded in the float32 bucket index
        return logits + 3.0e4
    raise AssertionError(kind)


@pytest.mark.isa_variants
@needs_extension
@pytest.mark.parametrize("kind", ["rounded", "integers", "all_equal", "banned", "single_finite", "peaked", "wide",
                                  "offset"])
@pytest.mark.parametrize("vocab_size", [7, 1000, 50257])
def test_adversarial_logits_match_reference(kind, vocab_size):
    num_rows = 6 if vocab_size > 5000 else 24
    g = torch.Generator().manual_seed(vocab_size + len(kind))
    logits = adversarial_logits(kind, num_rows, vocab_size, g)
    top_k, top_p, min_p = random_params(num_rows, vocab_size, g)
    # The parameter edges on fixed rows: no truncation at all, top_k > vocab, top_k = 0, top_p = 1, min_p = 0.
    top_k[1:4] = torch.tensor([0, vocab_size + 1, vocab_size])
    top_p[1:4] = 1.0
    min_p[1:4] = 0.0
    assert_matches_reference(logits, top_k, top_p, min_p, seed=vocab_size)
    if kind in ("banned", "single_finite"):
        mask = kept_mask(logits, top_k, top_p, min_p)
        assert not bool((mask & torch.isneginf(logits)).any()), "a banned token was kept"


@needs_extension
def test_ties_are_broken_by_token_id():
    logits = torch.zeros(4, 10)
    top_k = torch.tensor([3, 0, 0, 0])
    top_p = torch.tensor([1.0, 0.35, 1.0, 1.0])
    min_p = torch.tensor([0.0, 0.0, 0.0, 1.0])
    logits[2, [3, 7]] = 1.0  # a tie for the top between ids 3 and 7
    top_k[2] = 1
    mask = kept_mask(logits, top_k, top_p, min_p)
    assert mask[0].nonzero().flatten().tolist() == [0, 1, 2]
    assert mask[1].nonzero().flatten().tolist() == [0, 1, 2, 3]  # cum_before 0.3 < 0.35, 0.4 is not
    assert mask[2].nonzero().flatten().tolist() == [3]
    assert mask[3].all()  # min_p = 1 keeps every token tied with the max


@pytest.mark.isa_variants
@needs_extension
def test_threads_and_strided_rows_give_the_same_result():
    g = torch.Generator().manual_seed(5)
    full = torch.randn(16, 3, 50257, generator=g) * 2
    logits = full[:, -1, :]  # (B, V) rows 3 * V apart: used in place
    assert not logits.is_contiguous()
    top_k, top_p, min_p = random_params(16, 50257, g)
    uniform = torch.rand(16, dtype=torch.float64, generator=g)
    expected = cpu_sampler.topk_topp_minp_sample(logits.contiguous(), top_k, top_p, min_p, uniform, num_threads=1)
    for num_threads in (2, 3, 64):
        got = cpu_sampler.topk_topp_minp_sample(logits, top_k, top_p, min_p, uniform, num_threads=num_threads)
        assert torch.equal(got, expected)
    one = cpu_sampler.topk_topp_minp_select(logits, top_k, top_p, min_p, num_threads=1)
    many = cpu_sampler.topk_topp_minp_select(logits, top_k, top_p, min_p, num_threads=4)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


@needs_extension
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_small_vocab_property(data):
    vocab_size = data.draw(st.integers(1, 12))
    num_rows = data.draw(st.integers(1, 4))
    values = st.sampled_from([NEG_INF, -3.0, -1.5, -0.5, 0.0, 0.0, 0.25, 1.0, 2.0])
    logits = torch.tensor(data.draw(st.lists(st.lists(values, min_size=vocab_size, max_size=vocab_size),
                                             min_size=num_rows, max_size=num_rows)), dtype=torch.float32)
    logits[:, 0] = torch.where(torch.isneginf(logits).all(dim=1), 0.0, logits[:, 0])
    top_k = torch.tensor(data.draw(st.lists(st.integers(-1, vocab_size + 2), min_size=num_rows, max_size=num_rows)))
    top_p = torch.tensor(data.draw(st.lists(st.floats(0.015625, 1.0, width=32), min_size=num_rows, max_size=num_rows)))
    min_p = torch.tensor(data.draw(st.lists(st.sampled_from([0.0, 0.1, 0.5, 1.0]), min_size=num_rows,
                                            max_size=num_rows)))
    assert_matches_reference(logits, top_k, top_p, min_p, seed=data.draw(st.integers(0, 1000)))


@needs_extension
def test_draw_frequencies_follow_the_kept_distribution():
    logits = torch.tensor([[2.0, 1.5, NEG_INF, 1.0, 0.5, 0.5, -1.0, 0.0, 3.0, -4.0, 1.2, 0.1]])  # (1, 12)
    top_k, top_p, min_p = torch.tensor([7]), torch.tensor([0.85]), torch.tensor([0.05])
    mask = reference.sampling_mask(logits, top_k, top_p, min_p)[0]
    expected = torch.softmax(logits.double(), dim=-1)[0] * mask
    expected /= expected.sum()
    num_draws = 200_000
    g = torch.Generator().manual_seed(11)
    uniform = torch.rand(num_draws, dtype=torch.float64, generator=g)
    drawn = cpu_sampler.topk_topp_minp_sample(logits.expand(num_draws, -1), top_k.expand(num_draws),
                                              top_p.expand(num_draws), min_p.expand(num_draws), uniform)
    counts = torch.bincount(drawn, minlength=logits.shape[1]).double()
    assert counts[~mask].sum() == 0, "a masked token was drawn"
    freq = counts / num_draws
    sigma = torch.sqrt(expected * (1 - expected) / num_draws)
    assert bool(((freq - expected).abs() <= 5 * sigma + 1e-12).all()), (freq, expected)
    kept = mask.nonzero().flatten()
    chi2 = float((((counts - num_draws * expected)[kept]) ** 2 / (num_draws * expected[kept])).sum())
    dof = len(kept) - 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof), f"chi-square {chi2:.1f} with {dof} degrees of freedom"


@needs_extension
def test_extension_rejects_bad_inputs_with_clear_errors():
    from fastgpt2.kernels.native import _C

    logits = np.random.RandomState(0).randn(2, 10).astype(np.float32)
    top_k, top_p, min_p, uniform = np.zeros(2, np.int64), np.full(2, 0.9), np.zeros(2), np.full(2, 0.5)
    cases = [
        ((logits.astype(np.float64), top_k, top_p, min_p, uniform), TypeError, "logits must be a float32 array"),
        ((logits[0], top_k, top_p, min_p, uniform), ValueError, "logits must be 2-D (batch, vocab), got shape (10,)"),
        ((logits[:, ::2], top_k, top_p, min_p, uniform), ValueError, "contiguous vocab dimension"),
        ((logits, top_k.astype(np.int16), top_p, min_p, uniform), TypeError, "top_k must be an int64 or int32 array"),
        ((logits, top_k, top_p.astype(np.float16), min_p, uniform), TypeError, "top_p must be a float64 or float32"),
        ((logits, top_k, top_p[:1], min_p, uniform), ValueError, "top_p must have shape (2,)"),
        ((logits, top_k, np.array([0.9, 0.0]), min_p, uniform), ValueError, "top_p[1] = 0.0 is outside (0, 1]"),
        ((logits, top_k, top_p, np.array([0.0, 1.5]), uniform), ValueError, "min_p[1] = 1.5 is outside [0, 1]"),
        ((logits, top_k, top_p, min_p, np.array([0.5, 1.0])), ValueError, "uniform[1] = 1.0 is outside [0, 1)"),
        ((logits, top_k, np.array([0.9, np.nan]), min_p, uniform), ValueError, "top_p[1] = nan"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=re.escape(message)):
            _C.topk_topp_minp_sample(*args, 1)
    with pytest.raises(ValueError, match="num_threads must be >= 1"):
        _C.topk_topp_minp_sample(logits, top_k, top_p, min_p, uniform, 0)
    for value, message in ((np.nan, "logits row 1 contains NaN"), (np.inf, r"logits row 1 contains \+inf")):
        bad = logits.copy()
        bad[1, 3] = value
        with pytest.raises(ValueError, match=message):
            _C.topk_topp_minp_sample(bad, top_k, top_p, min_p, uniform, 2)
        with pytest.raises(ValueError, match=message):
            _C.topk_topp_minp_select(bad, top_k, top_p, min_p, 1)
    bad = logits.copy()
    bad[0] = -np.inf
    with pytest.raises(ValueError, match="logits row 0 is -inf everywhere"):
        _C.topk_topp_minp_sample(bad, top_k, top_p, min_p, uniform, 1)


@pytest.fixture(params=["extension", "fallback"])
def sampler_path(request, monkeypatch):
    """cpu_sampler as built, and with the extension hidden (the torch fallback)."""
    if request.param == "extension" and not cpu_sampler.HAS_EXTENSION:
        pytest.skip("the C++ extension is not in use")
    if request.param == "fallback":
        monkeypatch.setattr(cpu_sampler, "_C", None)
    return request.param


def test_cpu_sampler_rejects_bad_inputs(sampler_path):
    logits = torch.randn(2, 10)
    top_k, top_p, min_p, uniform = torch.zeros(2, dtype=torch.int64), torch.full((2,), 0.9), torch.zeros(2), \
        torch.rand(2, dtype=torch.float64)
    bad_nan = logits.clone()
    bad_nan[1, 3] = float("nan")
    cases = [
        ((bad_nan, top_k, top_p, min_p, uniform), ValueError, "logits row 1 contains NaN"),
        ((logits.double(), top_k, top_p, min_p, uniform), TypeError, "logits must be float32"),
        ((logits[0], top_k, top_p, min_p, uniform), ValueError, "logits must be a 2-D"),
        ((logits, top_k.float(), top_p, min_p, uniform), TypeError, "top_k must be an integer tensor"),
        ((logits, top_k, top_p[:1], min_p, uniform), ValueError, r"top_p must have shape \(2,\)"),
        ((logits, top_k, top_p, min_p, [0.5, 0.5]), TypeError, "uniform must be a tensor"),
        ((logits, top_k, torch.tensor([0.9, 1.5]), min_p, uniform), ValueError, r"top_p\[1\] = 1.5 is outside"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            cpu_sampler.topk_topp_minp_sample(*args)
    with pytest.raises(ValueError, match="logits row 1 contains NaN"):
        cpu_sampler.topk_topp_minp_select(bad_nan, top_k, top_p, min_p)


def test_fallback_matches_extension_and_warns_once(monkeypatch):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 300, generator=g) * 2
    logits[0, :50] = NEG_INF
    params = random_params(8, 300, g)
    uniform = torch.rand(8, dtype=torch.float64, generator=g)
    built = None
    if cpu_sampler.HAS_EXTENSION:
        built = (cpu_sampler.topk_topp_minp_sample(logits, *params, uniform),
                 cpu_sampler.topk_topp_minp_select(logits, *params))
    monkeypatch.setattr(cpu_sampler, "_C", None)
    cpu_sampler._warn_no_extension.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        drawn = cpu_sampler.topk_topp_minp_sample(logits, *params, uniform)
        selected = cpu_sampler.topk_topp_minp_select(logits, *params)
        cpu_sampler.topk_topp_minp_sample(logits, *params, uniform)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "not built" in messages[0] and "torch reference sampler" in messages[0]
    assert torch.equal(drawn, reference.topk_topp_minp_sample(logits, *params, uniform))
    if built is not None:
        assert torch.equal(drawn, built[0])
        assert torch.equal(selected[0], built[1][0]) and torch.equal(selected[2], built[1][2])
        torch.testing.assert_close(selected[1], built[1][1], rtol=1e-6, atol=1e-7)  # float32 renormalised probs


@needs_extension
def test_raw_entry_point_checks_sizes_and_values():
    """The lean entry point cpu_sampler uses (addresses + lists) still checks what it can: sizes and value ranges."""
    from fastgpt2.kernels.native import _C

    logits = torch.randn(2, 10)
    out = torch.full((2,), -7, dtype=torch.int64)
    args = [logits.data_ptr(), 2, 10, 10, [0, 0], [0.9, 0.9], [0.0, 0.0], [0.5, 0.5], out.data_ptr(), 1]
    _C._topk_topp_minp_sample_raw(*args)
    assert torch.equal(out, cpu_sampler.topk_topp_minp_sample(
        logits, torch.zeros(2, dtype=torch.int64), torch.full((2,), 0.9), torch.zeros(2), torch.full((2,), 0.5)))
    for index, value, message in ((5, [0.9], "top_p must have 2 values"), (6, [0.0, 1.5], r"min_p\[1\] = 1.5"),
                                  (7, [0.5, 1.0], r"uniform\[1\] = 1.0 is outside \[0, 1\)"),
                                  (3, 5, "non-overlapping rows")):
        bad = list(args)
        bad[index] = value
        with pytest.raises(ValueError, match=message):
            _C._topk_topp_minp_sample_raw(*bad)


@pytest.mark.isa_variants
@needs_extension
def test_fast_path_exp_error_bound_holds():
    """The fast top-p path (float32 exp) takes a decision only when its margin exceeds a bound built on this error
    bound of its exp against the exact exp(x - max); it must hold for any float32 logits and max."""
    from fastgpt2.kernels.native import _C

    rng = np.random.default_rng(0)
    n = 1 << 18
    maxes = np.concatenate([rng.uniform(-300, 300, n), rng.uniform(-1, 1, n), rng.uniform(-3e4, 3e4, n),
                            np.ldexp(1.0, rng.integers(-30, 15, n)) * rng.choice([-1.0, 1.0], n)]).astype(np.float32)
    gaps = np.concatenate([rng.uniform(0, 90, 2 * n), rng.uniform(0, 1, n),
                           np.ldexp(rng.uniform(1, 2, n), rng.integers(-40, 7, n))])
    x = np.minimum((maxes - gaps).astype(np.float32), maxes)  # float32 logits at or below their max
    t = maxes - x  # the gap as the extension rounds it (float32 subtraction)
    e, rel_error, gap_error, gap_max = _C._exp32_of_gaps(t)
    exact = np.exp(x.astype(np.float64) - maxes.astype(np.float64))
    inside = t <= gap_max
    assert inside.mean() > 0.9 and (~inside).sum() > 1000
    ratio = np.abs(e[inside] / exact[inside] - 1) / (rel_error + t[inside].astype(np.float64) * gap_error)
    assert ratio.max() <= 1.0, f"exp32 error exceeds its bound by {ratio.max():.3f}x"
    assert ratio.max() > 0.3, "the bound is so loose that it would defer too many rows"
    assert (e[~inside] == 0).all() and (exact[~inside] <= np.exp(-gap_max * (1 - 1e-6))).all()
    special, *_ = _C._exp32_of_gaps(np.array([0.0, np.inf, 1e-30, 0.5], dtype=np.float32))
    assert special[0] == 1.0 and special[1] == 0.0 and special[2] == 1.0
    assert abs(special[3] / math.exp(-0.5) - 1) < 3e-7


@pytest.mark.isa_variants
@needs_extension
@pytest.mark.parametrize("scale", [0.5, 1.0, 3.0, 8.0])
def test_fast_top_p_path_equals_exact_path(scale):
    """Top-p-only rows take the fast path (float32 exp, checked margins); min_p = 1e-300, which keeps every token of
    these rows, sends the same rows through the exact path. Draws must be identical, the fast path must decide most
    rows, and a few rows are checked against the reference too (decided and deferred ones)."""
    from fastgpt2.kernels.native import _C

    g = torch.Generator().manual_seed(int(scale * 10))
    top_p_values = [0.3, 0.5, 0.8, 0.9, 0.95, 0.99, 0.999, 1 - 1e-6]
    num_rows, vocab_size = 6 * len(top_p_values), 50257
    logits = torch.randn(num_rows, vocab_size, generator=g) * scale  # (B, V) float32
    top_k = torch.zeros(num_rows, dtype=torch.int64)
    top_p = torch.tensor(top_p_values * 6, dtype=torch.float64)
    uniform = torch.rand(num_rows, dtype=torch.float64, generator=g)
    before = _C._sampler_fast_path_stats()
    fast = cpu_sampler.topk_topp_minp_sample(logits, top_k, top_p, torch.zeros(num_rows), uniform, num_threads=1)
    decided, deferred = (after - start for after, start in zip(_C._sampler_fast_path_stats(), before))
    assert decided + deferred == num_rows
    assert decided >= num_rows // 2, f"the fast path decided only {decided} of {num_rows} rows"
    min_p_tiny = torch.full((num_rows,), 1e-300, dtype=torch.float64)
    exact = cpu_sampler.topk_topp_minp_sample(logits, top_k, top_p, min_p_tiny, uniform, num_threads=1)
    assert _C._sampler_fast_path_stats() == (before[0] + decided, before[1] + deferred), "min_p > 0 must skip it"
    assert torch.equal(fast, exact)
    rows = slice(0, len(top_p_values))  # one row of each top_p
    assert torch.equal(fast[rows], reference.topk_topp_minp_sample(logits[rows], top_k[rows], top_p[rows],
                                                                   torch.zeros(len(top_p_values)), uniform[rows]))


@pytest.mark.isa_variants
@needs_extension
def test_the_fast_path_narrow_window_and_its_fallback_draw_the_exact_paths_tokens():
    """The fast top-p path first looks for the boundary in a window around its estimated crossing, narrower than the
    bracket that holds it for certain, and goes on to the bracket where that window does not decide. Rows of N(0, 3)
    logits at top-p 0.9 and 0.99 (wide brackets) take both routes; every draw must be the exact path's, and the
    narrow windows must both decide rows and miss some (so that the fallback ran)."""
    from fastgpt2.kernels.native import _C

    g = torch.Generator().manual_seed(23)
    num_rows, vocab_size = 256, 50257
    logits = torch.randn(num_rows, vocab_size, generator=g) * 3.0  # (B, V) float32
    top_k = torch.zeros(num_rows, dtype=torch.int64)
    top_p = torch.tensor([0.9, 0.99] * (num_rows // 2), dtype=torch.float64)
    uniform = torch.rand(num_rows, dtype=torch.float64, generator=g)
    rows_before, windows_before = _C._sampler_fast_path_stats(), _C._sampler_window_stats()
    fast = cpu_sampler.topk_topp_minp_sample(logits, top_k, top_p, torch.zeros(num_rows), uniform, num_threads=1)
    decided, _ = (after - start for after, start in zip(_C._sampler_fast_path_stats(), rows_before))
    tried, missed = (after - start for after, start in zip(_C._sampler_window_stats(), windows_before))
    exact = cpu_sampler.topk_topp_minp_sample(logits, top_k, top_p, torch.full((num_rows,), 1e-300), uniform,
                                              num_threads=1)  # min_p > 0 keeps every token here: the exact path
    assert torch.equal(fast, exact)
    assert decided >= num_rows * 3 // 4, f"the fast path decided only {decided} of {num_rows} rows"
    assert tried >= num_rows // 2, f"only {tried} of {num_rows} rows tried a narrow window"
    assert 1 <= missed < tried // 4, f"{missed} of {tried} narrow windows missed"
    assert len(set(fast.tolist())) > num_rows // 2  # varied draws


@pytest.mark.isa_variants
@needs_extension
@pytest.mark.parametrize("vocab_size", [7, 33, 1000, 50257])
def test_a_row_scanned_by_the_row_before_is_sampled_as_alone(vocab_size):
    """The fast path's pass over a row scans the next row of its thread on the way (max, smallest finite value, NaN
    and -inf), instead of a pass of its own: each row of a batch must give what it gives alone, and a bad value in a
    later row must still be found."""
    g = torch.Generator().manual_seed(vocab_size)
    num_rows = 10
    logits = torch.randn(num_rows, vocab_size, generator=g) * 3.0  # (B, V) float32
    logits[2, ::5] = NEG_INF  # banned tokens: the scan's second pass for the smallest finite value
    logits[3] = -logits[3].abs()
    logits[3, 0], logits[3, -1] = -0.0, 0.0  # the max is a zero of either sign: the order of the max matters
    logits[4, 1:] = NEG_INF  # one finite token
    logits[5] *= 40  # wider than the histogram: the clamped exp
    logits[6] += 3.0e4  # large logits
    logits[7] *= 0.2
    top_k = torch.zeros(num_rows, dtype=torch.int64)
    top_p = torch.full((num_rows,), 0.9, dtype=torch.float64)
    min_p = torch.zeros(num_rows, dtype=torch.float64)
    uniform = torch.rand(num_rows, dtype=torch.float64, generator=g)
    batch = cpu_sampler.topk_topp_minp_sample(logits, top_k, top_p, min_p, uniform, num_threads=1)
    alone = torch.cat([cpu_sampler.topk_topp_minp_sample(logits[i:i + 1], top_k[i:i + 1], top_p[i:i + 1],
                                                         min_p[i:i + 1], uniform[i:i + 1]) for i in range(num_rows)])
    assert torch.equal(batch, alone)
    assert torch.equal(batch, reference.topk_topp_minp_sample(logits, top_k, top_p, min_p, uniform))
    for bad, message in ((float("nan"), "logits row 6 contains NaN"), (float("inf"), "logits row 6 contains \\+inf"),
                         (NEG_INF, "logits row 6 is -inf everywhere")):
        corrupt = logits.clone()
        if bad == NEG_INF:
            corrupt[6] = NEG_INF
        else:
            corrupt[6, vocab_size - 1] = bad  # in the scalar tail after the vector steps, where there is one
        with pytest.raises(ValueError, match=message):
            cpu_sampler.topk_topp_minp_sample(corrupt, top_k, top_p, min_p, uniform, num_threads=1)


@pytest.mark.isa_variants
@needs_extension
@pytest.mark.parametrize("vocab_size", [1, 7, 15, 16, 17, 33, 1000, 50257])
def test_argmax_is_torch_argmax(vocab_size):
    """Greedy decoding's C++ argmax gives torch.argmax's indices: the first largest value (ties, -0 == +0, rows of
    -inf, +inf), the first NaN where a row holds one; over every vector width's tail, any row count and thread count,
    and strided rows."""
    g = torch.Generator().manual_seed(vocab_size)
    logits = torch.randn(40, vocab_size, generator=g) * 3  # (B, V)
    logits[1] = float("-inf")
    logits[2] = torch.round(logits[2])  # many ties
    logits[3, -1] = logits[3].max() + 1  # the last token wins (a vector tail)
    logits[4, vocab_size // 2] = float("nan")
    logits[4, -1] = float("nan")
    logits[5] = 0.0
    logits[5, -1] = -0.0
    logits[6, 0] = -0.0  # -0 first, then +0 everywhere: index 0
    logits[7, vocab_size // 3] = float("inf")
    logits[7, -1] = float("inf")
    logits[8, -1] = float("nan")  # the only NaN at the end of the row
    want = torch.argmax(logits, dim=-1)
    for rows in (1, 7, 16, 17, 40):
        for threads in (1, 2, 3):
            got = cpu_sampler.argmax(logits[:rows], num_threads=threads)
            assert got.dtype == torch.int64 and torch.equal(got, want[:rows]), (rows, threads)
    wide = torch.zeros(40, vocab_size + 5)
    wide[:, :vocab_size] = logits
    strided = wide[:, :vocab_size]  # row stride vocab_size + 5
    assert strided.stride(0) == vocab_size + 5 and torch.equal(cpu_sampler.argmax(strided), want)
    # Layouts the kernel does not take go to torch, with the same result.
    assert torch.equal(cpu_sampler.argmax(logits.t().contiguous().t()), want)
    assert torch.equal(cpu_sampler.argmax(logits.double()), want)


def _one_ulp(values: torch.Tensor) -> torch.Tensor:
    """float32 spacing at each value (float64 tensor): one unit in the last place."""
    v = values.float().abs()
    return (torch.nextafter(v, torch.full_like(v, float("inf"))) - v).double()


@pytest.mark.isa_variants
@needs_extension
@pytest.mark.parametrize("vocab_size", [1, 7, 16, 17, 33, 1000, 50257])
def test_row_logprobs_are_log_softmax_to_one_rounding(vocab_size):
    """row_logprobs (the engine's logprobs without a (R, V) log_softmax): each target's and top-N logprob within one
    float32 ulp of float64 log_softmax; top-N ids in (value descending, id ascending) order, rows with ties and -inf
    included (top_n past the finite values takes -inf tokens by id); the same values bit for bit alone, in any batch,
    on any thread count and with strided rows."""
    g = torch.Generator().manual_seed(vocab_size)
    logits = torch.randn(24, vocab_size, generator=g) * 3  # (R, V)
    logits[1] = torch.round(logits[1])  # ties
    logits[2, : vocab_size // 2] = float("-inf")
    logits[3] = -1e4  # one value everywhere: every logprob -log(V)
    logits[4] = logits[4] * 30  # peaked, far tails (exp underflows past -708)
    top_n = min(vocab_size, 20)
    targets = torch.randint(0, vocab_size, (24,), generator=g).tolist()
    targets[5] = -1
    exact = torch.log_softmax(logits.double(), dim=-1)  # (R, V)
    got_targets, got_ids, got_values = cpu_sampler.row_logprobs(logits, targets, top_n)
    assert len(got_targets) == len(got_ids) == len(got_values) == 24
    for r in range(24):
        if targets[r] < 0:
            assert math.isnan(got_targets[r])
        else:
            want = exact[r, targets[r]]
            assert got_targets[r] == want or abs(got_targets[r] - want) <= _one_ulp(want), (r, float(want))
        # rank order: value descending, then id ascending
        order = sorted(range(vocab_size), key=lambda i: (-float(logits[r, i]), i))[:top_n]
        assert got_ids[r] == order, r
        want = exact[r, order]
        err = (torch.tensor(got_values[r], dtype=torch.float64) - want).abs()
        finite = torch.isfinite(want)
        assert bool((err[finite] <= _one_ulp(want[finite])).all()), r
        assert all(v == float("-inf") for v, f in zip(got_values[r], finite.tolist()) if not f)
    # Bitwise the same alone, in other batches, on other thread counts, and from strided rows.
    wide = torch.zeros(24, vocab_size + 3)
    wide[:, :vocab_size] = logits
    for rows, threads, source in ((1, 1, logits), (7, 2, logits), (24, 3, wide[:, :vocab_size]), (24, 1, logits)):
        for start in range(0, 24, rows):
            part = source[start:start + rows]
            t, i, v = cpu_sampler.row_logprobs(part, targets[start:start + rows], top_n, num_threads=threads)
            n = part.shape[0]
            assert i == got_ids[start:start + n] and v == got_values[start:start + n], (rows, threads)
            assert [x for x in t if x == x] == [x for x in got_targets[start:start + n] if x == x], (rows, threads)


def test_row_logprobs_edge_rows_and_bad_inputs(sampler_path):
    """Rows whose log_softmax is NaN (a NaN, +inf, or -inf everywhere) give torch's values (the reference); no targets
    and top_n = 0 are allowed; bad top_n, targets, rows and shapes are one-line errors, with the extension and on
    the torch fallback alike."""
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(1))
    for r, value in ((0, float("nan")), (1, float("inf"))):
        bad = logits.clone()
        bad[r, 7] = value
        got = cpu_sampler.row_logprobs(bad, [3, 4, 5, 6], 2)
        want = reference.row_logprobs(bad, [3, 4, 5, 6], 2)
        assert got[1] == want[1] and np.allclose(got[0], want[0], equal_nan=True)
    banned = logits.clone()
    banned[2] = float("-inf")
    assert math.isnan(cpu_sampler.row_logprobs(banned, [0, 0, 0, 0], 0)[0][2])
    none, ids, values = cpu_sampler.row_logprobs(logits, None, 0)
    assert none is None and ids == values == [[]] * 4
    with pytest.raises(ValueError, match=r"the number of top logprobs must be in \[0, 100\], got 101"):
        cpu_sampler.row_logprobs(logits, None, 101)
    with pytest.raises(ValueError, match=r"target token id 100 \(row 1\) is outside the vocabulary \[0, 100\)"):
        cpu_sampler.row_logprobs(logits, [0, 100, 0, 0], 1)
    with pytest.raises(ValueError, match=r"targets must have one token id per logits row \(4\), got 3"):
        cpu_sampler.row_logprobs(logits, [0, 0, 0], 1)
    with pytest.raises(ValueError, match="logits must be a 2-D"):
        cpu_sampler.row_logprobs(logits[0], None, 1)
    with pytest.raises(ValueError, match="row 4 is outside the logits' 4 rows"):
        cpu_sampler.row_logprobs(logits, [0], 1, rows=[4])
    with pytest.raises(ValueError, match=r"target token id -2 \(row 0\) is outside the vocabulary"):
        cpu_sampler.row_logprobs(logits, [-2, 0, 0, 0], 1)
    got = cpu_sampler.row_logprobs(logits, [5, -1], 3, rows=[2, 0])
    want = reference.row_logprobs(logits[[2, 0]], [5, -1], 3)
    assert got[1] == want[1] and np.allclose(got[0], want[0], equal_nan=True, atol=1e-5)


def test_dispatch_row_logprobs_takes_every_dtype():
    """dispatch.row_logprobs (the engine's entry): float32 CPU logits to the C++ pass, other dtypes to torch, the same
    ids and values within float32 rounding (bf16 logits widened exactly)."""
    from fastgpt2.kernels import dispatch

    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(2)) * 3
    want = cpu_sampler.row_logprobs(logits, [1, 2, 3], 4)
    for dtype in (torch.bfloat16, torch.float64):
        x = logits.to(dtype)
        got = dispatch.row_logprobs(x, [1, 2, 3], 4)
        exact = reference.row_logprobs(x.double(), [1, 2, 3], 4)
        assert got[1] == exact[1]
        assert np.allclose(got[0], exact[0], atol=1e-5) and np.allclose(got[2], exact[2], atol=1e-5)
    assert dispatch.row_logprobs(logits, [1, 2, 3], 4) == want


@needs_extension
def test_row_logprobs_of_listed_rows_equal_those_rows_alone():
    """rows=[...] computes the listed rows where they are (the sampler's unchanged rows, without a copy): bitwise the
    values of the same rows passed alone; a row outside the logits is a one-line error."""
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(3)) * 2
    rows = [4, 0, 5]
    got = cpu_sampler.row_logprobs(logits, [7, 8, 9], 3, rows=rows)
    assert got == cpu_sampler.row_logprobs(logits[rows], [7, 8, 9], 3)
    with pytest.raises(ValueError, match="row 6 is outside the logits' 6 rows"):
        cpu_sampler.row_logprobs(logits, None, 1, rows=[6])
    with pytest.raises(ValueError, match=r"targets must have one token id per logits row \(2\), got 1"):
        cpu_sampler.row_logprobs(logits, [1], 1, rows=[0, 1])
