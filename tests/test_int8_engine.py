"""LLM(quantization="int8") and --quantization int8: the C++ step's int8 kernels serve every step, compute what the
torch model on the dequantised weights, with its layers' inputs quantised, computes (to float32 rounding), and bad
combinations are refused clearly.
Bitwise batch invariance of int8 is tested with the float32 path's in tests/test_batch_invariance.py."""
import subprocess
import sys

import pytest
import torch

from fastgpt2 import GPT2, LLM, GPT2Config, SamplingParams
from fastgpt2.kernels import native
from tests.conftest import make_hf_model

CONFIG = GPT2Config(vocab_size=50257, n_positions=128, n_embd=96, n_layer=2, n_head=3)


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("int8")
    make_hf_model(CONFIG, seed=11).save_pretrained(d)
    return d


@pytest.mark.skipif(not native.HAS_EXTENSION, reason="C++ extension not built")
def test_int8_step_matches_the_quantised_torch_model(wide_dir, monkeypatch):
    prompts = [[5, 17, 300, 9000], list(range(100, 140)), [50000]]
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=3, ignore_eos=True)
    llm = LLM(str(wide_dir), device="cpu", quantization="int8")
    assert llm.engine.runner.cpu_step.weight_dtype == "int8"
    assert llm.model.decode_weight_dtype == "int8"
    cpp = llm.generate(prompts, params, use_tqdm=False)
    monkeypatch.setenv("FASTGPT2_NATIVE_DECODE", "0")
    torch_llm = LLM(str(wide_dir), device="cpu", quantization="int8")
    assert torch_llm.engine.runner.cpu_step is None
    ref = torch_llm.generate(prompts, params, use_tqdm=False)
    float32 = LLM(str(wide_dir), device="cpu").generate(prompts, params, use_tqdm=False)
    assert len({t for a in cpp for t in a.outputs[0].token_ids}) > 6  # varied text, not one token repeated
    for a, b, f in zip(cpp, ref, float32):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert la.keys() == lb.keys()
            assert max(abs(la[t] - lb[t]) for t in la) < 1e-3
    # The int8 weights are not the float32 ones: the logprobs move (the tokens, with these wide margins, do not).
    assert any(a.outputs[0].logprobs != f.outputs[0].logprobs for a, f in zip(cpp, float32))


def test_bad_quantization_is_refused(wide_dir):
    with pytest.raises(ValueError, match="quantization must be None or 'int8'"):
        LLM(str(wide_dir), device="cpu", quantization="int4")
    with pytest.raises(ValueError, match="computes in float32"):
        LLM(str(wide_dir), device="cpu", dtype="bfloat16", quantization="int8")
    with pytest.raises(ValueError, match="CPU only"):
        LLM(str(wide_dir), device="cuda", quantization="int8")
    with pytest.raises(ValueError, match="quantize_weights_int8"):
        LLM(GPT2(CONFIG), quantization="int8")
    with pytest.raises(ValueError, match="multiple of 32"):
        LLM(GPT2Config(vocab_size=300, n_positions=32, n_embd=48, n_layer=1, n_head=2), device="cpu",
            quantization="int8")


def test_quantized_module_is_served_and_reload_quantizes_again(wide_dir):
    model = GPT2.from_pretrained(str(wide_dir)).quantize_weights_int8()
    llm = LLM(model, quantization="int8")
    before = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    fresh = GPT2.from_pretrained(str(wide_dir))  # float32 weights
    llm.load_weights(fresh.state_dict())
    assert llm.model.decode_weight_dtype == "int8"
    w = llm.model.h[0].mlp.c_fc.weight
    assert torch.equal(w, GPT2.from_pretrained(str(wide_dir)).quantize_weights_int8().h[0].mlp.c_fc.weight)
    after = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert after[0].outputs[0].token_ids == before[0].outputs[0].token_ids


def test_cli_quantization_flag(wide_dir):
    out = subprocess.run([sys.executable, "-m", "fastgpt2", "generate", "--model", str(wide_dir), "--quantization",
                          "int8", "--device", "cpu", "--seed", "1", "--max-tokens", "5", "--prompt", "Hello"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip()
