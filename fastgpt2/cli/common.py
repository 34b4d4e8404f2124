"""Flags shared by the subcommands that load a model, and the one function that builds the LLM from them."""
from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "--config_model", "--config-model", "--pretrained-model-name", "--checkpoint",
                   dest="model", default="gpt2",
                   help="hub id, local Hugging Face directory, OpenAI release directory (models/124M) or preset "
                        "(124M, 355M, gpt2-xl ...; official weights)")
    p.add_argument("--random-weights", action="store_true",
                   help="random weights of the --model preset/config: meaningless text at real speed, no download")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on CPU, float16 on CUDA")
    p.add_argument("--quantization", default=None, choices=["int8"],
                   help="int8: int8 weights and activations on the CPU (q8_0-like blocks of 32 with float32 scales)")
    p.add_argument("--seed", type=_seed, default=None,
                   help="random seed, an integer in [0, 2**64 - 1] (default: a fresh one each run)")


def _seed(text: str) -> int:
    # torch.Generator.manual_seed takes 64 bits; it also takes negative seeds down to -2**63, but as aliases
    # (-1 seeds as 2**64 - 1), and SamplingParams.seed is non-negative, so negatives are refused.
    try:
        seed = int(text)
    except ValueError:
        seed = None
    if seed is None or not 0 <= seed < 2**64:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**64 - 1], got {text!r}; omit --seed for a "
                                         f"fresh one each run")
    return seed


def build_llm(args, **engine_kwargs):
    import random

    from fastgpt2 import LLM, GPT2Config
    from fastgpt2.model.config import canonical_preset

    model = args.model
    if args.random_weights:
        if canonical_preset(model) is not None:
            model = GPT2Config.from_name(model)
        else:
            from fastgpt2.model.checkpoint import read_config, resolve_checkpoint_dir

            model = read_config(resolve_checkpoint_dir(model))
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    if isinstance(model, GPT2Config):
        import torch

        torch.manual_seed(seed)  # random weights are reproducible with --seed
    return LLM(model, device=args.device, dtype=args.dtype, seed=seed, quantization=args.quantization, **engine_kwargs)
