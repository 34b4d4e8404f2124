"""`fastgpt2 perplexity`: sliding-window perplexity of a text file, JSONL with a `text` field, or a directory."""
from __future__ import annotations

import argparse
import json

from fastgpt2.cli.common import add_model_args, build_llm

_FIELDS = ("perplexity", "mean_nll", "num_tokens", "num_bytes", "bits_per_byte")


def add_parser(sub):
    p = sub.add_parser("perplexity", help="perplexity and bits per byte of a text, sliding windows over the context",
                       description="Each token is scored once, with windows of up to the model's context "
                                   "(n_positions tokens) batched through prefill; the result is exp of the mean "
                                   "per-token NLL over all tokens of all documents.")
    add_model_args(p)
    p.add_argument("--data", required=True,
                   help="a text file (one document), JSONL with a `text` field (one per line), or a directory of "
                        "them (every file under it, hidden ones skipped)")
    p.add_argument("--stride", type=_positive, default=512,
                   help="tokens newly scored per window, at most n_positions - 1 (= disjoint windows); a smaller "
                        "stride gives each token more context and costs more windows (default 512)")
    p.add_argument("--prepend-eos", action="store_true",
                   help="condition each document's first token on <|endoftext|> and score it, with lm-eval's "
                        "rolling windows (default: the first token is context only)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    p.set_defaults(func=run)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def run(args) -> int:
    from fastgpt2.eval.corpus import read_documents

    documents = read_documents(args.data)  # a bad path fails before the model loads
    llm = build_llm(args)
    result = llm.perplexity(documents, stride=args.stride, prepend_eos=args.prepend_eos).to_dict()
    if args.json:
        print(json.dumps(result))
    else:
        for name in _FIELDS:
            value = result[name]
            print(f"{name + ':':<15}{value:,}" if isinstance(value, int) else f"{name + ':':<15}{value:.6g}")
    return 0
