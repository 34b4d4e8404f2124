"""The CPU step's packed GEMM (csrc/packed_gemm.cpp): y = epilogue(x W^T + b) against float64, and its contract that
every output element is one FMA chain over k in order, so a token's outputs are bitwise the same whatever the token
count, tiling, thread count or weight storage layout around it. int8 (W8A8, csrc/packed_gemm_q8.cpp) computes bitwise
the chain over blocks of 32 that a numpy emulation of q8_0 weights and activations computes."""
import numpy as np
import pytest
import torch

from fastgpt2.kernels import native

pytestmark = pytest.mark.skipif(not native.HAS_EXTENSION, reason="C++ extension not built")

# Row counts with and without a partial last panel of 16; K from 8 to the 124M MLP's 3072; token counts that cross
# every tile size (8 tokens per AVX-512 tile, 6 per AVX2 tile), the token-block size, the K-block size and the split
# of the tokens over 2 threads (AVX-512 variants, from 96 tokens).
SHAPES = [(37, 16), (100, 64), (64, 72), (2304, 768), (768, 3072)]
TOKENS = [1, 2, 3, 5, 6, 7, 8, 9, 12, 13, 16, 17, 25, 64, 95, 97, 130, 200]


def _reference(w, x, b, epilogue, y0):
    v = x.astype(np.float64) @ w.astype(np.float64).T + (0.0 if b is None else b.astype(np.float64))
    if epilogue == "gelu":
        v = 0.5 * v * (1 + np.tanh(0.7978845608028654 * (v + 0.044715 * v ** 3)))
    if epilogue == "accumulate":
        v = v + y0
    return v


def _sequential_fma(w, x):
    """The contract's chain in float64 arithmetic: c = fl32(x0 w0); c = fl32(c + x_k w_k) for k = 1..K-1. A float32
    product is exact in float64, so each step differs from a float32 FMA only by double rounding (rarely)."""
    c = np.zeros((x.shape[0], w.shape[0]), dtype=np.float32)
    for k in range(w.shape[1]):
        c = (c.astype(np.float64) + np.outer(x[:, k].astype(np.float64), w[:, k].astype(np.float64))).astype(np.float32)
    return c


@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("epilogue", ["store", "gelu", "accumulate"])
def test_matches_float64(rows, cols, epilogue):
    rng = np.random.default_rng(rows * cols)
    w = rng.standard_normal((rows, cols), dtype=np.float32)
    b = rng.standard_normal(rows, dtype=np.float32)
    gemm = native._C.PackedLinear(w)
    for t in [1, 7, 13, 64]:
        x = rng.standard_normal((t, cols), dtype=np.float32)
        y0 = rng.standard_normal((t, rows), dtype=np.float32)
        y = y0.copy()
        gemm.forward(x, y, b, epilogue, 2)
        ref = _reference(w, x, b, epilogue, y0)
        # float32 chains of K products: relative to the output's scale, a few K * 2^-24 at worst
        np.testing.assert_allclose(y, ref, rtol=0, atol=1e-6 * np.sqrt(cols) * np.abs(ref).max() + 1e-6)


@pytest.mark.isa_variants
@pytest.mark.parametrize("tokens", [1, 13])
def test_each_output_is_one_chain_over_k_in_order(tokens):
    """Without bias and epilogue, y is the sequential float32 chain itself, bitwise (an 8-lane or blocked sum, or
    any other order, differs in most elements of this draw; double rounding in the emulation is a ~2^-29 event)."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((40, 776), dtype=np.float32)
    x = rng.standard_normal((tokens, 776), dtype=np.float32)
    y = np.empty((tokens, 40), np.float32)
    native._C.PackedLinear(w).forward(x, y, None, "store", 1)
    assert np.array_equal(y, _sequential_fma(w, x))
    lanes = (x.astype(np.float32)[:, None, :] * w[None]).reshape(tokens, 40, -1, 8).sum(2, dtype=np.float32).sum(-1)
    assert not np.array_equal(y, lanes)  # the check can tell orders apart


@pytest.mark.isa_variants
@pytest.mark.parametrize("rows,cols,dtype", [(r, c, d) for r, c in SHAPES for d in ("float32", "bfloat16", "int8")
                                             if d != "int8" or c % 32 == 0])  # int8 blocks are 32 inputs
def test_bitwise_batch_invariant(rows, cols, dtype):
    """Row t of any batch equals row t computed alone or in any other batch, with 0 (caller only), 1 or 2 threads."""
    rng = np.random.default_rng(rows + cols)
    w = rng.standard_normal((rows, cols), dtype=np.float32)
    b = rng.standard_normal(rows, dtype=np.float32)
    gemm = native._C.PackedLinear(w, dtype)
    x = rng.standard_normal((max(TOKENS), cols), dtype=np.float32) * 3
    y0 = rng.standard_normal((max(TOKENS), rows), dtype=np.float32)
    for epilogue in ["gelu", "accumulate"]:
        full = y0.copy()
        gemm.forward(x, full, b, epilogue, 2)
        for i, t in enumerate(TOKENS):
            for offset in {0, max(TOKENS) - t}:  # the batch's first rows, and its last rows
                for threads in {i % 3, 2}:
                    part = y0[offset:offset + t].copy()
                    gemm.forward(x[offset:offset + t].copy(), part, b, epilogue, threads)
                    assert np.array_equal(part, full[offset:offset + t]), (t, offset, epilogue, threads)


def test_bfloat16_storage_equals_rounded_float32_weights():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((200, 64), dtype=np.float32)
    rounded = torch.from_numpy(w).to(torch.bfloat16).float().numpy()
    x = rng.standard_normal((20, 64), dtype=np.float32)
    y_bf16, y_f32 = np.empty((20, 200), np.float32), np.empty((20, 200), np.float32)
    native._C.PackedLinear(w, "bfloat16").forward(x, y_bf16, None, "store", 2)
    native._C.PackedLinear(rounded).forward(x, y_f32, None, "store", 2)
    assert np.array_equal(y_bf16, y_f32)


def _q8_blocks(v):
    """llama.cpp's quantize_row_q8_0_ref with a float32 scale, in numpy, on each row of v (n, K): per block of 32
    d = absmax / 127, q = roundf(v * (1 / d)) (ties away from zero), 0 when d == 0. Returns q (n, K / 32, 32) float32
    integers and d (n, K / 32, 1) float32."""
    blocks = v.reshape(v.shape[0], -1, 32)
    d = np.abs(blocks).max(-1, keepdims=True) / np.float32(127)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, np.float32(1)), np.float32(0)).astype(np.float32)
    y = blocks * inv
    q = np.trunc(y) + np.where(np.abs(y - np.trunc(y)) >= 0.5, np.sign(y), 0).astype(np.float32)
    assert np.abs(q).max() <= 127
    return q.astype(np.float32), d


def _q8_reference(w):
    """The dequantised weights: float(q) * d."""
    q, d = _q8_blocks(w)
    return (q * d).reshape(w.shape)


def _w8a8_chain(w, x):
    """The int8 kernel's contract in numpy: per block b of 32 inputs the exact integer dot product of x's and w's q,
    then c = fl32(fl32(dw * dx) * dot + c) over the blocks in order (the product is exact in float64, so the emulation
    differs from a float32 FMA only by double rounding, rarely)."""
    qw, dw = _q8_blocks(w)
    qx, dx = _q8_blocks(x)
    dots = np.einsum("tbk,rbk->trb", qx.astype(np.int64), qw.astype(np.int64))  # exact
    c = np.zeros((x.shape[0], w.shape[0]), np.float32)
    for b in range(qw.shape[1]):
        s = (dx[:, b] * dw[:, b].T).astype(np.float32)  # (T, rows): one float32 multiply
        c = (s.astype(np.float64) * dots[:, :, b] + c).astype(np.float32)
    return c


def test_quantize_q8_is_q8_0_with_float32_scales():
    rng = np.random.default_rng(11)
    w = rng.standard_normal((50, 96), dtype=np.float32) * np.float32(0.02)
    w[3, 32:64] = 0  # a zero block: scale 0, q 0
    w[4, :32] = 0
    w[4, :6] = [127, 2.5, -3.5, 0.5, -0.5, 1.5]  # scale 1: exact halves, rounded away from zero (not to even)
    dq = native._C.quantize_q8(w)
    assert dq.dtype == np.float32 and dq.shape == w.shape
    assert np.array_equal(dq, _q8_reference(w))
    assert not dq[3, 32:64].any()
    assert dq[4, :6].tolist() == [127, 3, -4, 1, -1, 2]
    blocks = np.abs(w).reshape(50, -1, 32).max(-1, keepdims=True)
    assert np.all(np.abs(dq - w).reshape(50, -1, 32) <= blocks / 254 * 1.0001)  # half a step of absmax / 127


@pytest.mark.isa_variants
@pytest.mark.parametrize("rows,cols", [(37, 32), (100, 64), (2304, 768), (768, 3072)])
def test_int8_is_the_w8a8_chain_over_blocks(rows, cols):
    """int8 quantises each token's activations as q8_0 does the weights, takes exact integer dot products per block
    of 32 and chains them over the blocks in order: bitwise the numpy emulation, alone in a tile and in several tiles
    (K blocks), with VNNI or without; the bias and epilogue then as for float32."""
    rng = np.random.default_rng(rows * 7 + cols)
    w = rng.standard_normal((rows, cols), dtype=np.float32)
    b = rng.standard_normal(rows, dtype=np.float32)
    q8 = native._C.PackedLinear(w, "int8")
    assert q8.weight_dtype == "int8"
    for t in [1, 3, 7, 13, 64, 104]:
        x = rng.standard_normal((t, cols), dtype=np.float32)
        x[0, :32] = 0  # a zero activation block: scale 0
        want = _w8a8_chain(w, x)
        y = np.empty((t, rows), np.float32)
        q8.forward(x, y, None, "store", t % 3)
        assert np.array_equal(y, want), t
        y0 = rng.standard_normal((t, rows), dtype=np.float32)
        y = y0.copy()
        q8.forward(x, y, b, "accumulate", 2)
        np.testing.assert_allclose(y, y0 + (want + b), rtol=1e-6, atol=1e-6 * np.abs(want).max())
    # The activations are quantised: the result is not the dequantised weights' float32 product (the check can fail).
    x = rng.standard_normal((5, cols), dtype=np.float32)
    y = np.empty((5, rows), np.float32)
    q8.forward(x, y, None, "store", 1)
    ref = x.astype(np.float64) @ _q8_reference(w).astype(np.float64).T
    assert not np.allclose(y, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(y, ref, rtol=0, atol=0.02 * np.abs(ref).max())  # q8_0 activations: ~0.4% per block


@pytest.mark.isa_variants
def test_int8_carries_nan_and_inf_as_float32_does():
    """A non-finite activation or weight makes what it multiplies NaN (its block's scale is NaN), rather than
    quantising to a finite value: corrupt inputs reach the sampler's NaN check instead of becoming plausible text."""
    rng = np.random.default_rng(8)
    w = rng.standard_normal((40, 96), dtype=np.float32)
    x = rng.standard_normal((4, 96), dtype=np.float32)
    x[1, 40], x[2, 70] = np.nan, np.inf
    y = np.empty((4, 40), np.float32)
    native._C.PackedLinear(w, "int8").forward(x, y, None, "store", 1)
    assert np.isnan(y[1:3]).all() and np.isfinite(y[[0, 3]]).all()
    w[5, 33] = np.nan
    native._C.PackedLinear(w, "int8").forward(x[[0, 3]].copy(), y[:2], None, "store", 1)
    assert np.isnan(y[:2, 5]).all() and np.isfinite(np.delete(y[:2], 5, axis=1)).all()
    dq = native._C.quantize_q8(w)
    assert np.isnan(dq[5, 32:64]).all() and np.isfinite(np.delete(dq, 5, axis=0)).all()


def test_bad_input_is_a_clear_error():
    w = np.ones((4, 16), np.float32)
    with pytest.raises(ValueError, match="multiple of 8"):
        native._C.PackedLinear(np.ones((4, 12), np.float32))
    with pytest.raises(ValueError, match="weight_dtype"):
        native._C.PackedLinear(w, "int4")
    with pytest.raises(ValueError, match="multiple of 32"):
        native._C.PackedLinear(np.ones((4, 48), np.float32), "int8")
    with pytest.raises(ValueError, match="multiple of 32"):
        native._C.quantize_q8(np.ones((4, 48), np.float32))
    gemm = native._C.PackedLinear(w)
    with pytest.raises(ValueError, match="x must have shape"):
        gemm.forward(np.ones((2, 8), np.float32), np.empty((2, 4), np.float32))
    with pytest.raises(ValueError, match="out must have shape"):
        gemm.forward(np.ones((2, 16), np.float32), np.empty((3, 4), np.float32))
    with pytest.raises(ValueError, match="epilogue"):
        gemm.forward(np.ones((2, 16), np.float32), np.empty((2, 4), np.float32), None, "relu")
    with pytest.raises(TypeError, match="float32"):
        gemm.forward(np.ones((2, 16), np.float64), np.empty((2, 4), np.float32))
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        gemm.forward(np.ones((2, 16), np.float32), np.empty((2, 4), np.float32), None, "store", 2, 0)


@pytest.mark.parametrize("num_threads", [0, 2])
def test_repeated_forward_computes_the_product_each_time(num_threads):
    """forward's repeats (the benchmark's warm pool) computes the same product every time: 'accumulate' adds it
    `repeats` times, bitwise what as many single calls give."""
    rng = np.random.default_rng(4)
    gemm = native._C.PackedLinear(rng.standard_normal((48, 64), dtype=np.float32))
    x = rng.standard_normal((20, 64), dtype=np.float32)
    once, repeated = np.zeros((20, 48), np.float32), np.zeros((20, 48), np.float32)
    for _ in range(3):
        gemm.forward(x, once, None, "accumulate", num_threads)
    gemm.forward(x, repeated, None, "accumulate", num_threads, 3)
    assert np.array_equal(once, repeated) and np.abs(once).min() > 0


@pytest.mark.isa_variants
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_argmax_is_torch_argmax_of_the_stored_product(dtype):
    """argmax (the kArgmax epilogue: greedy decoding without the logits) picks, per token, what torch.argmax picks on
    forward's stored product, bias included, over the first `limit` columns: the first of equal values, the first
    NaN, the first of a row of -inf, -0 and +0 as equal; for token counts across the tile sizes and column counts
    with a partial last panel."""
    rng = np.random.default_rng(7)
    for rows in (37, 101, 50257):
        w = rng.standard_normal((rows, 64), dtype=np.float32)
        w[rows // 3] = w[rows - 2]  # equal columns in different panels (and different tiles' panels)
        w[5] = w[6]  # equal neighbours in one panel
        gemm = native._C.PackedLinear(w, dtype)
        for tokens in (1, 7, 8, 9, 64, 65):
            x = rng.standard_normal((tokens, 64), dtype=np.float32)
            for b in (None, rng.standard_normal(rows, dtype=np.float32)):
                y = np.empty((tokens, rows), np.float32)
                gemm.forward(x, y, b, "store", 2)
                for limit in {rows, rows - 3, 17, 1}:
                    index = np.empty(tokens, np.int64)
                    gemm.argmax(x, index, b, limit, 1 + tokens % 2)
                    expected = torch.argmax(torch.from_numpy(y[:, :limit]), dim=-1).numpy()
                    assert np.array_equal(index, expected), (rows, tokens, limit, b is None)
    # Special values through the bias (the product is 0): ties across panels, NaN late in the row, all -inf, signed 0.
    rows = 300
    gemm = native._C.PackedLinear(np.zeros((rows, 32), np.float32), dtype)
    x = rng.standard_normal((9, 32), dtype=np.float32)
    for case in ("ties", "nan", "all -inf", "signed zeros", "inf"):
        b = np.full(rows, -np.inf, np.float32)
        if case == "ties":
            b[[290, 17, 100]] = 3.0
        if case == "nan":
            b[3], b[[250, 260]] = 5.0, np.nan
        if case == "signed zeros":
            b[:], b[40] = -0.0, 0.0
        if case == "inf":
            b[[120, 7]] = np.inf
        y = np.empty((9, rows), np.float32)
        gemm.forward(x, y, b, "store", 1)
        index = np.empty(9, np.int64)
        gemm.argmax(x, index, b, rows, 2)
        assert np.array_equal(index, torch.argmax(torch.from_numpy(y), dim=-1).numpy()), case


def test_argmax_bad_input_is_a_clear_error():
    gemm = native._C.PackedLinear(np.ones((4, 16), np.float32))
    with pytest.raises(ValueError, match=r"limit must be in \[1, 4\], got 5"):
        gemm.argmax(np.ones((2, 16), np.float32), np.empty(2, np.int64), None, 5)
    with pytest.raises(ValueError, match="index must have shape"):
        gemm.argmax(np.ones((2, 16), np.float32), np.empty(3, np.int64), None, 4)
