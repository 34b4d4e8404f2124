"""The whole engine driven through the Triton kernels (interpreted on CPU when there is no GPU): the same tokens as
the torch reference path, for greedy and seeded sampling, prefill chunks, decodes and a prefix-cache hit."""
import pytest
import torch

from fastgpt2 import LLM, GPT2Config, SamplingParams

CONFIG = GPT2Config(vocab_size=50257, n_positions=128, n_embd=128, n_layer=2, n_head=2)


def _run(monkeypatch, force_triton: bool):
    monkeypatch.setenv("FASTGPT2_FORCE_TRITON", "1" if force_triton else "0")
    torch.manual_seed(0)
    model = LLM(CONFIG, device="cpu", block_size=16, max_num_batched_tokens=32).model
    with torch.no_grad():
        for name, p in model.named_parameters():  # context-dependent greedy text, as in tests/conftest.py
            if name.endswith(("attn.c_attn.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")):
                p.mul_(4.0)
        model.ln_f.weight.mul_(30)  # wide top-1 margins
    llm = LLM(model, device="cpu", block_size=16, max_num_batched_tokens=32)
    prompts = [list(range(100, 105)), list(range(200, 240)), list(range(100, 120))]
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=5, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)]
    first = llm.generate(prompts, params, use_tqdm=False)
    again = llm.generate(prompts[2], params[2], use_tqdm=False)  # prefix-cache hit on its first block
    return [o.outputs[0].token_ids for o in first + again]


def test_engine_tokens_equal_through_triton(monkeypatch):
    reference = _run(monkeypatch, False)
    triton_out = _run(monkeypatch, True)
    assert triton_out == reference
    assert len(set(reference[0] + reference[2])) > 2
