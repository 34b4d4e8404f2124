"""Training throughput: tokens/s of one fine-tuning step as the trainer runs it (FSDP2, flash attention and fused
cross-entropy on CUDA, bf16 compute with float32 master weights where supported) against a plain transformers loop
(GPT2LMHeadModel, AdamW, torch.autocast to the same dtype) on the same weights and batch, steps alternated.

    python -m fastgpt2.train.bench --model 124M --batch-size 8 --seq-len 1024      # a GPU
    python -m fastgpt2.train.bench --smoke                                         # a tiny config on the CPU
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from fastgpt2.model import GPT2, GPT2Config
from fastgpt2.train import modeling, optim, parallel
from fastgpt2.train.config import TrainConfig


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fastgpt2_step(model, optimizer, tokens: torch.Tensor, grad_clip: float) -> None:
    """The trainer's step on one micro-batch of tokens (B, T + 1): summed token loss over the count, backward,
    clipping, AdamW."""
    loss, count = modeling.token_loss_sum(model(input_ids=tokens[:, :-1]).logits, tokens[:, 1:])
    (loss / count).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def transformers_step(model, optimizer, tokens: torch.Tensor, grad_clip: float, dtype: torch.dtype) -> None:
    with torch.autocast(tokens.device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run(config: GPT2Config, batch_size: int, seq_len: int, steps: int, warmup: int, dtype: str, device: str | None,
        activation_checkpointing: bool = False, compile_blocks: bool = False) -> dict:
    """Median seconds per step of each system and the tokens/s ratio (fastgpt2 / transformers)."""
    import transformers

    ctx = parallel.init_distributed(device)
    try:
        compute = parallel.compute_dtype(dtype, ctx.device)
        torch.manual_seed(0)
        ours = GPT2(config)
        modeling.set_dropout(ours, 0.0)
        with tempfile.TemporaryDirectory() as tmp:
            ours.save_pretrained(tmp)
            theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp).to(ctx.device).train()
        flash = modeling.use_flash_attention(ours, ctx.device)
        ours = parallel.shard_model(ours.to(ctx.device).train(), ctx, compute, activation_checkpointing,
                                    compile_blocks)
        settings = TrainConfig(train="-")  # nanoGPT's AdamW settings for both
        our_opt = optim.build_optimizer(ours, settings, ctx.device)
        their_opt = torch.optim.AdamW(theirs.parameters(), lr=settings.lr, betas=(settings.beta1, settings.beta2),
                                      weight_decay=settings.weight_decay, foreach=True)
        tokens = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1),
                               generator=torch.Generator().manual_seed(1)).to(ctx.device)
        times: dict[str, list[float]] = {"fastgpt2": [], "transformers": []}
        for i in range(warmup + steps):
            for name in times:
                _sync(ctx.device)
                t0 = time.perf_counter()
                if name == "fastgpt2":
                    fastgpt2_step(ours, our_opt, tokens, settings.grad_clip)
                else:
                    transformers_step(theirs, their_opt, tokens, settings.grad_clip, compute)
                _sync(ctx.device)
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
        medians = {name: statistics.median(t) for name, t in times.items()}
        tokens = batch_size * seq_len
        return {"device": str(ctx.device), "dtype": str(compute).removeprefix("torch."), "flash_attention": flash,
                "tokens_per_step": tokens, **{f"{n}_s": m for n, m in medians.items()},
                **{f"{n}_tokens_per_s": tokens / m for n, m in medians.items()},
                "ratio": medians["transformers"] / medians["fastgpt2"]}
    finally:
        parallel.close_distributed(ctx)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m fastgpt2.train.bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="124M", help="preset whose shape is benchmarked (random weights)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10, help="timed steps per system (after --warmup)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--device", default=None)
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--smoke", action="store_true", help="a 2-layer, 64-wide model, batch 2 x 32, 2 steps: checks "
                                                        "the script runs, measures nothing")
    args = p.parse_args(argv)
    config = GPT2Config.from_name(args.model)
    if args.smoke:
        config = GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=64)
        args.batch_size, args.seq_len, args.steps, args.warmup = 2, 32, 2, 1
    result = run(config, args.batch_size, args.seq_len, args.steps, args.warmup, args.dtype, args.device,
                 args.activation_checkpointing, args.compile)
    print(f"training step, {args.model if not args.smoke else 'smoke config'}, batch {args.batch_size} x "
          f"{args.seq_len}, {result['device']}, {result['dtype']}, flash attention: {result['flash_attention']}")
    for name in ("fastgpt2", "transformers"):
        seconds, rate = result[f"{name}_s"], result[f"{name}_tokens_per_s"]
        print(f"  {name:<13} {seconds * 1e3:9.1f} ms/step  {rate:>10,.0f} tokens/s")
    print(f"  ratio (fastgpt2 / transformers tokens/s): {result['ratio']:.2f}x")
    return result


if __name__ == "__main__":
    main()
