"""int8's error against float32 on random GPT-2 124M weights (python -m fastgpt2.benchmarks.quantization [n_layer]
[num_tokens]): fastgpt2.model.quantize.quantization_error on the model as initialised (seed 0), for int8 (weights and
activations in blocks of 32, float32 scales) and llama.cpp's q8_0 (the same blocks, float16 scales), printed as
JSON."""
from __future__ import annotations

import json
import sys

import torch

from fastgpt2.model import quantize
from fastgpt2.model.config import GPT2Config
from fastgpt2.model.gpt2 import GPT2


def random_model(n_layer: int = 12, seed: int = 0) -> GPT2:
    """GPT-2 124M's geometry (n_embd 768, 12 heads, 50257 tokens) with n_layer blocks and GPT-2's random init, seeded,
    in eval mode."""
    torch.manual_seed(seed)
    return GPT2(GPT2Config.from_name("124M").replace(n_layer=n_layer)).eval()


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    n_layer = int(argv[0]) if argv else 12
    num_tokens = int(argv[1]) if len(argv) > 1 else 200
    report = quantize.quantization_error(random_model(n_layer), num_tokens=num_tokens)
    print(json.dumps({"n_layer": n_layer, **report}, indent=2))


if __name__ == "__main__":
    main()
