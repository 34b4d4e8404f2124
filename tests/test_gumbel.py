"""Gumbel-softmax decoding: straight-through logits equal the dense model's on the sampled ids, soft logits equal a
quadratic recomputation, the KV cache runs one position per step, gradients match finite differences, seeded noise
is reproducible, argmax(logits + Gumbel) samples softmax(logits), and bad arguments are refused."""
import copy

import pytest
import torch
import torch.nn.functional as F

from fastgpt2 import GPT2, GPT2Config, gumbel_softmax_decode
from fastgpt2.model.gumbel import GumbelSoftmaxOutput

# Per dtype: (atol, rtol) for logits of magnitude <= ~40 from the cached path against the dense forward.
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-11, 1e-11)}


@pytest.fixture(scope="module")
def wide(hf_checkpoint):
    """GPT-2 on the 'tiny' config (vocab 50257) with transformers' random wide-margin weights, float32, eval mode."""
    return GPT2.from_pretrained(hf_checkpoint("tiny"), device="cpu", dtype="float32")


def _small_model(vocab_size=101, n_positions=16, n_embd=32, n_layer=1, n_head=2, ln_f_scale=1.0, seed=0, **pdrop):
    torch.manual_seed(seed)
    model = GPT2(GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                            n_head=n_head, **pdrop)).eval()
    with torch.no_grad():
        model.ln_f.weight.mul_(ln_f_scale)  # spreads the logits so that the sampled distribution is far from uniform
    return model


def _context(vocab_size, batch=3, seq=5, seed=0):
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _gumbel(seed, shape, dtype, steps):
    """The noise gumbel_softmax_decode draws from torch.Generator().manual_seed(seed), one (B, V) tensor per step."""
    g, finfo = torch.Generator().manual_seed(seed), torch.finfo(dtype)
    return [-torch.log(-torch.log(torch.rand(shape, generator=g, dtype=dtype).clamp(finfo.tiny, 1 - finfo.eps)))
            for _ in range(steps)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_straight_through_logits_equal_dense_model(wide, dtype):
    """logits[:, i] equals model(context + sample_ids[:, :i]).logits[:, -1]; by causality one dense call on the whole
    sequence gives every step's reference at positions T - 1 .. T + N - 2. The fed samples are exactly one-hot."""
    model = copy.deepcopy(wide).to(dtype)
    ctx, N = _context(model.config.vocab_size), 8
    out = gumbel_softmax_decode(model, ctx, N, tau=0.5, straight_through=True,
                                generator=torch.Generator().manual_seed(1))
    assert isinstance(out, GumbelSoftmaxOutput)
    assert out.sample_ids.shape == (3, N) and out.sample_ids.dtype == torch.int64
    assert out.logits.shape == out.soft_samples.shape == (3, N, model.config.vocab_size)
    assert out.logits.dtype == dtype
    with torch.no_grad():
        ref = model(torch.cat([ctx, out.sample_ids], dim=1)).logits[:, ctx.shape[1] - 1:-1]  # (B, N, V)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.logits.detach(), ref, atol=atol, rtol=rtol)
    assert torch.equal(out.soft_samples.detach(), F.one_hot(out.sample_ids, model.config.vocab_size).to(dtype))
    # Each id is argmax(logits + Gumbel noise) with the noise drawn from the generator.
    noise = torch.stack(_gumbel(1, (3, model.config.vocab_size), dtype, N), dim=1)
    assert torch.equal(out.sample_ids, (out.logits.detach() + noise).argmax(-1))


def test_soft_logits_equal_quadratic_recompute(wide):
    """Soft mode: each step's logits equal the dense forward over the context's embeddings followed by the soft
    samples fed so far (soft_samples[:, :i] @ wte), recomputed from scratch for every step; y is
    softmax((logits + g) / tau) with the generator's noise."""
    ctx, N, tau = _context(wide.config.vocab_size, batch=2, seq=4, seed=2), 6, 2.0
    out = gumbel_softmax_decode(wide, ctx, N, tau=tau, generator=torch.Generator().manual_seed(3))
    noise = _gumbel(3, (2, wide.config.vocab_size), torch.float32, N)
    soft = out.soft_samples.detach()
    assert soft.max() < 0.5  # genuinely soft: no step is close to one-hot at this tau
    with torch.no_grad():
        for i in range(N):
            embeds = torch.cat([wide.wte(ctx), soft[:, :i] @ wide.wte.weight], dim=1)  # (B, T + i, C)
            ref = wide(inputs_embeds=embeds).logits[:, -1]
            torch.testing.assert_close(out.logits[:, i].detach(), ref, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(soft[:, i], torch.softmax((out.logits[:, i] + noise[i]) / tau, -1),
                                       atol=1e-7, rtol=1e-5)
            assert torch.equal(out.sample_ids[:, i], (out.logits[:, i] + noise[i]).argmax(-1))


def test_kv_cache_runs_one_position_per_step(wide):
    """No recomputation: every layer projects the context once, then one position per step (N - 1 steps; the last
    sample is never fed)."""
    ctx, N = _context(wide.config.vocab_size, batch=2, seq=7), 5
    rows = []
    handles = [block.attn.c_attn.register_forward_hook(lambda m, inputs, out: rows.append(inputs[0].shape[:2]))
               for block in wide.h]
    try:
        gumbel_softmax_decode(wide, ctx, N, generator=torch.Generator().manual_seed(0))
    finally:
        for handle in handles:
            handle.remove()
    n_layer = wide.config.n_layer
    assert rows == [(2, 7)] * n_layer + [(2, 1)] * (n_layer * (N - 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_cached_in_chunks_equals_dense(dtype):
    """Chunks of 4, 1 and 6 positions over the cache (masked offset, single query, then masked offset again) give the
    dense forward's logits; a cache that would pass n_positions, or one of the wrong depth, is refused."""
    model = _small_model(vocab_size=97, n_positions=16, n_embd=64, n_layer=2, ln_f_scale=20.0).to(dtype)
    ids = _context(97, batch=2, seq=11, seed=4)
    with torch.no_grad():
        ref = model(ids).logits
        cache, pieces = None, []
        for lo, hi in ((0, 4), (4, 5), (5, 11)):
            logits, cache = model.forward_cached(model.wte(ids[:, lo:hi]), cache)
            pieces.append(logits)
        assert [k.shape for k, _ in cache] == [(2, 2, 11, 32)] * 2
        atol, rtol = TOLERANCES[dtype]
        torch.testing.assert_close(torch.cat(pieces, dim=1), ref, atol=atol, rtol=rtol)
        with pytest.raises(ValueError, match="exceed the model's context of 16"):
            model.forward_cached(model.wte(ids[:, :6]), cache)
        with pytest.raises(ValueError, match="kv_cache has 1 layers, the model 2"):
            model.forward_cached(model.wte(ids[:, :1]), cache[:1])


@pytest.mark.parametrize("straight_through", [False, True])
def test_gradients_reach_every_parameter(wide, straight_through):
    model = copy.deepcopy(wide)
    ctx = _context(model.config.vocab_size, batch=2, seq=3, seed=5)
    out = gumbel_softmax_decode(model, ctx, 4, tau=2.0, straight_through=straight_through,
                                generator=torch.Generator().manual_seed(6))
    weights = torch.randn(out.soft_samples.shape, generator=torch.Generator().manual_seed(7))
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad((out.soft_samples * weights).sum(), params)
    for name, grad in zip(names, grads):
        assert torch.isfinite(grad).all() and grad.abs().max() > 0, name
    assert {"wte.weight", "h.0.attn.c_attn.weight", "ln_f.weight", "ln_f.bias"} <= set(names)


def test_gradient_matches_finite_differences():
    """Soft mode, float64, the same noise in every evaluation: the directional derivative of a smooth loss of the
    soft samples along a random direction d over all parameters equals (L(p + eps d) - L(p - eps d)) / (2 eps), to
    1e-6 relative (central differences: O(eps^2) truncation, ~1e-10 rounding at eps = 1e-6)."""
    model = _small_model(vocab_size=37, n_positions=12, n_embd=32, n_layer=1, ln_f_scale=10.0, seed=8).double()
    ctx = _context(37, batch=2, seq=3, seed=9)
    weights = torch.randn(2, 5, 37, generator=torch.Generator().manual_seed(10), dtype=torch.float64)

    def loss():
        out = gumbel_softmax_decode(model, ctx, 5, tau=0.7, generator=torch.Generator().manual_seed(11))
        return (out.soft_samples * weights).sum()

    params = list(model.parameters())
    g = torch.Generator().manual_seed(12)
    direction = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    analytic = sum((grad * d).sum() for grad, d in zip(torch.autograd.grad(loss(), params), direction))
    eps, values = 1e-6, []
    with torch.no_grad():
        for sign in (1.0, -2.0, 1.0):  # to p + eps d, to p - eps d, back to p
            for p, d in zip(params, direction):
                p.add_(sign * eps * d)
            values.append(loss())
    numeric = (values[0] - values[1]) / (2 * eps)
    assert abs(analytic) > 1e-3
    torch.testing.assert_close(numeric, analytic.detach(), atol=0, rtol=1e-6)


def test_same_seed_same_samples_other_seed_others():
    model = _small_model(vocab_size=101)
    ctx = _context(101, batch=4, seq=3, seed=13)

    def run(seed):
        return gumbel_softmax_decode(model, ctx, 6, tau=0.5, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(14), run(14), run(15)
    assert torch.equal(a.sample_ids, b.sample_ids)
    assert torch.equal(a.soft_samples, b.soft_samples) and torch.equal(a.logits, b.logits)
    # 24 draws from near-uniform distributions over 101 tokens: a coincidence has probability ~ 101^-24.
    assert not torch.equal(a.sample_ids, c.sample_ids)
    assert not torch.equal(a.soft_samples, c.soft_samples)
    torch.manual_seed(16)  # generator=None: torch's default generator
    d = gumbel_softmax_decode(model, ctx, 6)
    torch.manual_seed(16)
    assert torch.equal(gumbel_softmax_decode(model, ctx, 6).sample_ids, d.sample_ids)


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    chi2 = ((counts - expected) ** 2 / expected).sum()
    return torch.special.gammaincc(torch.tensor((counts.numel() - 1) / 2, dtype=torch.float64), chi2 / 2).item()


def test_one_step_samples_follow_softmax_of_logits():
    """argmax(logits + Gumbel) is an exact draw from softmax(logits) whatever tau: 20,000 straight-through draws at
    tau = 0.05 of one step from one context pass Pearson's chi-square against softmax(logits) (p > 1e-4) and fail it
    against softmax(logits / tau), what tau would give if it wrongly entered the draw (p < 1e-10)."""
    model = _small_model(vocab_size=12, n_positions=8, n_embd=32, ln_f_scale=5.0, seed=17).double()
    draws = 20_000
    ctx = _context(12, batch=1, seq=3, seed=18).expand(draws, 3)
    with torch.no_grad():
        out = gumbel_softmax_decode(model, ctx, 1, tau=0.05, straight_through=True,
                                    generator=torch.Generator().manual_seed(19))
    logits = out.logits[0, 0]
    assert torch.equal(out.logits[:, 0], logits.expand(draws, -1))
    probs = torch.softmax(logits, -1)
    assert probs.max() < 0.5 and probs.min() > 0.01  # a spread distribution: the test has power on every token
    counts = torch.bincount(out.sample_ids[:, 0], minlength=12).double()
    assert _chi_square_p_value(counts, probs) > 1e-4
    assert _chi_square_p_value(counts, torch.softmax(logits / 0.05, -1)) < 1e-10


def test_list_context_equals_tensor_context():
    model = _small_model()
    ctx = _context(101, batch=2, seq=4, seed=20)
    a = gumbel_softmax_decode(model, ctx.tolist(), 3, generator=torch.Generator().manual_seed(21))
    b = gumbel_softmax_decode(model, ctx.int(), 3, generator=torch.Generator().manual_seed(21))
    assert torch.equal(a.sample_ids, b.sample_ids) and torch.equal(a.logits, b.logits)


def test_train_mode_dropout_acts_in_the_cached_steps():
    """The cached step uses the module's own dropout: train mode differs from eval, and reproduces under the same
    global seed (dropout) and generator seed (noise)."""
    model = _small_model(embd_pdrop=0.3, attn_pdrop=0.3, resid_pdrop=0.3, ln_f_scale=20.0)
    ctx = _context(101, batch=2, seq=4, seed=22)

    def run():
        torch.manual_seed(23)
        return gumbel_softmax_decode(model, ctx, 4, generator=torch.Generator().manual_seed(24)).logits.detach()

    evaluated = run()
    model.train()
    trained, again = run(), run()
    assert torch.equal(trained, again)
    assert (trained - evaluated).abs().max() > 0.1


@pytest.mark.parametrize("change,match", [
    ({"model": torch.nn.Linear(2, 2)}, "model must be a fastgpt2 GPT2"),
    ({"tau": 0.0}, "tau must be"), ({"tau": -1.0}, "tau must be"), ({"tau": float("nan")}, "tau must be"),
    ({"tau": float("inf")}, "tau must be"), ({"tau": True}, "tau must be"), ({"tau": "1"}, "tau must be"),
    ({"max_tokens": 0}, "max_tokens must be"), ({"max_tokens": 1.5}, "max_tokens must be"),
    ({"max_tokens": True}, "max_tokens must be"),
    ({"max_tokens": 13}, "4 context \\+ 13 new tokens exceed the model's context of 16"),
    ({"context_ids": [[1, 2, 3], [4, 5]]}, "equal-length lists"),
    ({"context_ids": torch.tensor([1, 2, 3])}, "shape \\(batch, seq\\)"),
    ({"context_ids": torch.zeros(2, 3)}, "integer token ids"),
    ({"context_ids": torch.zeros(2, 0, dtype=torch.long)}, "is empty"),
    ({"context_ids": [[1, 2, 101]]}, "token id 101 in context_ids is out of range for a vocabulary of 101"),
    ({"context_ids": [[1, -1, 2]]}, "token id -1 in context_ids is out of range"),
    ({"generator": 5}, "generator must be a torch.Generator"),
])
def test_bad_arguments_raise_value_error(change, match):
    args = {"model": _small_model(), "context_ids": _context(101, batch=2, seq=4), "max_tokens": 3, "tau": 1.0,
            "generator": None}
    args.update(change)
    with pytest.raises(ValueError, match=match):
        gumbel_softmax_decode(args.pop("model"), args.pop("context_ids"), **args)
