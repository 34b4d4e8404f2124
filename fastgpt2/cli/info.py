"""`fastgpt2 info`: config, parameter count and weight bytes of a model (presets need no weights at all), and the CPU
kernel variant in use."""
from __future__ import annotations

import torch

from fastgpt2.model.config import GPT2Config, canonical_preset


def add_parser(sub):
    p = sub.add_parser("info", help="print a model's config, parameter count and bytes of weights")
    p.add_argument("--model", default="124M", help="preset (124M, gpt2-medium, ...) or a Hugging Face directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=run)


def run(args) -> int:
    if canonical_preset(args.model) is not None:
        config, source = GPT2Config.from_name(args.model), f"preset {canonical_preset(args.model)} (no weights read)"
    else:
        from fastgpt2.model.checkpoint import read_config, resolve_checkpoint_dir

        directory = resolve_checkpoint_dir(args.model)
        config, source = read_config(directory), str(directory)
    n_params = config.num_parameters()
    bytes_per = torch.finfo(getattr(torch, args.dtype)).bits // 8
    print(f"model:        {args.model}  [{source}]")
    for field in ("n_layer", "n_head", "n_embd", "head_dim", "n_positions", "vocab_size", "layer_norm_epsilon"):
        print(f"{field + ':':<13} {getattr(config, field)}")
    print(f"parameters:   {n_params:,} (output head tied to wte)")
    print(f"weights:      {n_params * bytes_per:,} bytes in {args.dtype} ({n_params * bytes_per / 2**20:,.1f} MiB)")
    kv_per_token = 2 * config.n_layer * config.n_embd * bytes_per
    print(f"KV cache:     {kv_per_token:,} bytes per token in {args.dtype}")
    print_cpu_kernels()
    from fastgpt2.engine.cpu_step import CpuStep, greedy_screen_enabled

    screen = CpuStep.enabled() and greedy_screen_enabled()
    print(f"greedy:       {'LM head screened in int8, float32 for the rows kept' if screen else 'every logit computed'}"
          + (" (FASTGPT2_GREEDY_SCREEN=0 turns the screen off)" if screen else ""))
    return 0


def print_cpu_kernels() -> None:
    """The CPU, the C++ kernel variant chosen at import (FASTGPT2_CPU_ISA overrides it) and the variants built here."""
    from fastgpt2.kernels import dispatch

    kernels = dispatch.cpu_kernel_info()
    print(f"CPU:          {kernels['cpu'] or 'unknown'}")
    print(f"CPU kernels:  {kernels['isa'] or 'none, torch kernels (' + kernels['why_not'] + ')'}")
    runnable = kernels["runnable"]
    built = [f"{v}{'' if v in runnable else ' (not runnable here)'}" for v in kernels["built"]]
    print(f"variants:     built {', '.join(built) or 'none'}; this CPU runs {', '.join(runnable) or 'none of them'}")
