"""`fastgpt2 convert SRC DST`: any checkpoint fastgpt2 loads (OpenAI's TensorFlow release directory, a Hugging Face
directory, a hub id or preset) written out in the Hugging Face format that transformers loads."""
from __future__ import annotations

from pathlib import Path


def add_parser(sub):
    p = sub.add_parser("convert", help="write a checkpoint (e.g. OpenAI's models/124M) in the Hugging Face format")
    p.add_argument("src", help="OpenAI release directory (hparams.json, model.ckpt.*), Hugging Face directory, hub id "
                               "or preset")
    p.add_argument("dst", help="new or empty directory for config.json, model.safetensors, vocab.json, merges.txt")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written weights (default float32, as OpenAI released them)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from fastgpt2.model.gpt2 import GPT2
    from fastgpt2.model.tokenizer import Tokenizer

    dst = Path(args.dst).expanduser()
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ValueError(f"{dst} already exists and is not an empty directory; pass a new or empty one, so that no "
                         f"checkpoint is overwritten")
    model = GPT2.from_pretrained(args.src, device="cpu", dtype="float32")
    # The directory's own vocabulary (encoder.json + vocab.bpe, or vocab.json + merges.txt), else GPT-2's shipped one.
    tokenizer = Tokenizer.from_pretrained(model.checkpoint_dir)
    model.to(getattr(torch, args.dtype)).save_pretrained(dst, tokenizer)
    print(f"wrote {args.src} to {dst} ({model.num_parameters():,} parameters, {args.dtype}, Hugging Face format)")
    return 0
