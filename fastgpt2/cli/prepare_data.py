"""`fastgpt2 prepare-data`: tokenise text or JSONL into uint16 .bin shards (memory-mapped by `finetune`)."""
from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("prepare-data", help="tokenise text into .bin token shards for `finetune`",
                       description="Documents (a line each, or --whole-file) each followed by <|endoftext|>, as "
                                   "uint16 token ids in <output-dir>/<prefix>_000000.bin, ...; a Texar directory "
                                   "(train.txt, dev.txt) gives train_*.bin and val_*.bin.")
    p.add_argument("--input", required=True, help="text file, .jsonl with 'text' records, or a Texar directory")
    p.add_argument("--output-dir", required=True, help="directory for the shards")
    p.add_argument("--prefix", default="train", help="shard name prefix for a single input file (default train)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (default 100M)")
    p.add_argument("--whole-file", action="store_true", help="a text file is one document")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from fastgpt2.train import prepare_data

    prepare_data(args.input, args.output_dir, prefix=args.prefix, shard_tokens=args.shard_tokens,
                 whole_file=args.whole_file, progress=args.progress)
    return 0
