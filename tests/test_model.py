"""The model against Hugging Face transformers' GPT-2: same weights, same inputs, same logits."""
import pytest
import torch

from fastgpt2 import GPT2, GPT2Config
from tests.conftest import TINY_CONFIGS, make_hf_model

CONFIGS = {
    **TINY_CONFIGS,
    "124M": GPT2Config.from_name("124M"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    config = CONFIGS[name]
    hf = make_hf_model(config, seed=1)
    hf.save_pretrained(tmp_path)
    model = GPT2.from_pretrained(tmp_path, device="cpu", dtype="float32")
    ids = torch.randint(0, config.vocab_size, (3, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids)
    assert out.shape == (3, 37, config.vocab_size)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    assert (out.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_save_pretrained_loads_in_transformers(name, tmp_path):
    import transformers

    config = CONFIGS[name]
    torch.manual_seed(3)
    model = GPT2.from_pretrained(config, device="cpu")
    model.save_pretrained(tmp_path)
    for f in ("config.json", "model.safetensors", "vocab.json", "merges.txt"):
        assert (tmp_path / f).is_file(), f
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, config.vocab_size, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-4, rtol=0)
    # And back into fastgpt2: identical parameters.
    again = GPT2.from_pretrained(tmp_path, device="cpu")
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), again.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_bfloat16_close_to_float32(hf_checkpoint):
    directory = hf_checkpoint("tiny")
    f32 = GPT2.from_pretrained(directory, device="cpu", dtype="float32")
    bf16 = GPT2.from_pretrained(directory, device="cpu", dtype="bfloat16")
    assert bf16.wte.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        a, b = f32(ids), bf16(ids).float()
    # bf16 keeps ~3 significant digits; compare relative to the logit scale.
    assert (a - b).abs().max() / a.abs().max() < 0.05


def test_random_init_statistics():
    model = GPT2(GPT2Config(n_layer=4, n_head=2, n_embd=128, vocab_size=1000, n_positions=64))
    assert abs(model.wte.weight.std().item() - 0.02) < 0.002
    assert model.h[0].attn.c_attn.bias.abs().max() == 0
    assert abs(model.h[0].mlp.c_proj.weight.std().item() - 0.02 / (8 ** 0.5)) < 0.002
    assert torch.equal(model.ln_f.weight, torch.ones(128))


def test_dense_input_errors():
    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=128, vocab_size=100, n_positions=16))
    with pytest.raises(ValueError, match="out of range"):
        model(torch.tensor([[1, 100]]))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(batch, seq\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(1, 3))
