"""Greedy decoding's int8 screen of the LM head (csrc/argmax_screen.h): the pick is bitwise the plain float32 (or
bf16-weight) argmax's, whatever the logits look like: near-ties a rounding apart, equal rows, flat logits (too many
rows kept: the plain path takes over), non-finite activations, a limit below the vocabulary; and greedy generation
gives the same tokens with the screen on and off."""
import numpy as np
import pytest
import torch

from fastgpt2.kernels import native

pytestmark = pytest.mark.skipif(not native.HAS_EXTENSION, reason="C++ extension not built")


def _picks(gemm, x, limit, screen, threads=2):
    index = np.empty(x.shape[0], np.int64)
    gemm.argmax(x, index, None, limit, threads, screen)
    return index


@pytest.mark.isa_variants
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_screened_pick_is_the_plain_pick(dtype):
    rng = np.random.default_rng(11)
    rows, cols = 5003, 96
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    w[4000] = w[17]  # equal rows: the first wins
    w[2500] = w[1200]
    w[2501] = w[1200]
    w[2501, 3] = np.nextafter(w[2501, 3], np.float32(np.inf))  # a row one rounding away from another
    gemm = native._C.PackedLinear(w, dtype)
    for tokens in (1, 5, 8, 9, 33):
        x = rng.standard_normal((tokens, cols)).astype(np.float32)
        x[0] = w[17] * 20  # row 17 and its copy 4000 on top
        if tokens > 1:
            x[1] = w[1200] * 20  # rows 1200, 2500 and the perturbed 2501 a rounding apart at the top
        y = np.empty((tokens, rows), np.float32)
        gemm.forward(x, y, None, "store", 2)
        for limit in (rows, 4000, 1201, 1):
            expected = torch.argmax(torch.from_numpy(y[:, :limit]), dim=-1).numpy()
            got = _picks(gemm, x, limit, True, 1 + tokens % 2)
            assert np.array_equal(got, expected), (tokens, limit, got, expected)
            assert np.array_equal(got, _picks(gemm, x, limit, False))
    assert _picks(gemm, np.stack([w[17] * 20]), rows, True)[0] == 17


@pytest.mark.isa_variants
def test_screen_gives_way_where_it_cannot_decide():
    """Flat logits (x = 0: every row ties at 0, all kept, past the screen's cap), NaN and inf activations, huge ones:
    the plain path's picks (the first row; the first NaN's column, 0)."""
    rng = np.random.default_rng(3)
    rows, cols = 3000, 64
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    gemm = native._C.PackedLinear(w, "float32")
    x = rng.standard_normal((6, cols)).astype(np.float32)
    x[0] = 0.0
    x[1, 5] = np.nan
    x[2, 0] = np.inf
    x[3] *= 1e36
    x[4] = w[2999] * 3
    y = np.empty((6, rows), np.float32)
    gemm.forward(x, y, None, "store", 1)
    expected = torch.argmax(torch.from_numpy(y), dim=-1).numpy()
    got = _picks(gemm, x, rows, True)
    assert np.array_equal(got, expected) and got[0] == 0 and got[4] == 2999


def test_screen_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="float32 or bfloat16 weights and no bias"):
        gemm = native._C.PackedLinear(np.ones((64, 32), np.float32), "int8")
        gemm.argmax(np.ones((2, 32), np.float32), np.empty(2, np.int64), None, 64, 1, True)
    gemm = native._C.PackedLinear(np.ones((64, 40), np.float32))  # 40 inputs: no int8 blocks of 32
    with pytest.raises(ValueError, match="no screen for this weight"):
        gemm.argmax(np.ones((2, 40), np.float32), np.empty(2, np.int64), None, 64, 1, True)
    w = np.ones((64, 32), np.float32)
    w[3, 3] = np.inf
    with pytest.raises(ValueError, match="no screen for this weight"):
        native._C.PackedLinear(w).argmax(np.ones((2, 32), np.float32), np.empty(2, np.int64), None, 64, 1, True)


@pytest.mark.isa_variants
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_generation_is_the_same_with_and_without_the_screen(dtype, monkeypatch):
    """A tiny GPT-2 with wide top-1 margins (ln_f's weight x 30) and one with flat logits (x 0.01): the same greedy
    tokens from a step with the screen and one without, over a batch of prompts."""
    from fastgpt2 import LLM, GPT2Config, SamplingParams
    from fastgpt2.engine import cpu_step

    config = GPT2Config(vocab_size=50257, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    rng = np.random.default_rng(5)
    prompts = [[int(t) for t in rng.integers(0, 50000, size=n)] for n in (3, 9, 17, 4)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    runs = {}
    for scale in (30.0, 0.01):
        for screen in ("1", "0"):
            monkeypatch.setenv("FASTGPT2_GREEDY_SCREEN", screen)
            torch.manual_seed(0)
            llm = LLM(config, device="cpu", dtype=dtype)
            with torch.no_grad():
                llm.model.ln_f.weight.mul_(scale)
            llm.engine.runner.refresh_weights()
            step = llm.engine.runner.cpu_step
            assert step is not None and step.greedy_screen == (screen == "1") == cpu_step.greedy_screen_enabled()
            runs[scale, screen] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert runs[scale, "1"] == runs[scale, "0"], scale
    assert len({seq[-1] for seq in runs[30.0, "1"]}) == len(prompts)  # each prompt its own text, not one token
