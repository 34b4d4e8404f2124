"""Test setup: Triton's interpreter when no CUDA GPU is present (set before triton is first imported), the shared
reference fixtures (Hugging Face transformers' GPT-2 with random wide-margin weights), and the `isa_variants` marker:
tests/test_isa.py reruns the tests it marks once per CPU kernel variant this machine runs, each in a child process
with FASTGPT2_CPU_ISA=<variant>."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "isa_variants: C++ kernel correctness check that tests/test_isa.py reruns under "
                                       "every CPU kernel variant (FASTGPT2_CPU_ISA) this machine can run")

from fastgpt2.model.config import GPT2Config  # noqa: E402

# Tiny configs: irregular widths, heads of 64 as in every GPT-2 size, short contexts.
TINY_CONFIGS = {
    "tiny": GPT2Config(vocab_size=50257, n_positions=256, n_embd=128, n_layer=2, n_head=2),
    "small": GPT2Config(vocab_size=50257, n_positions=512, n_embd=192, n_layer=3, n_head=3),
}


def make_hf_model(config: GPT2Config, seed: int = 0, margin: float = 30.0):
    """transformers GPT2LMHeadModel with random weights; ln_f scaled so greedy top-1 margins are wide."""
    import transformers

    torch.manual_seed(seed)
    hf_config = transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.n_positions, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, layer_norm_epsilon=config.layer_norm_epsilon,
    )
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():
        # Random LayerNorm/bias parameters exercise every tensor the loader copies.
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.add_(0.05 * torch.randn_like(p))
            # At GPT-2's init the residual stream is mostly the input embedding, so greedy decoding would repeat one
            # token; stronger attention and MLP weights make the next token depend on the context.
            if name.endswith(("attn.c_attn.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")):
                p.mul_(4.0)
        # ln_f's bias would add the same vector to every position's logits; keep it out of the way of the margin.
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.weight.mul_(margin)
    return model


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """A factory: (config name, seed) -> directory written by transformers' save_pretrained, cached per session."""
    cache = {}

    def get(name: str = "tiny", seed: int = 0):
        key = (name, seed)
        if key not in cache:
            directory = tmp_path_factory.mktemp(f"hf-{name}-{seed}")
            make_hf_model(TINY_CONFIGS[name], seed).save_pretrained(directory)
            cache[key] = directory
        return cache[key]

    return get
