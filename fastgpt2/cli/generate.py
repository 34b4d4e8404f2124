"""`fastgpt2 generate`: the Texar GPT-2 example's interface (its old spellings included) on the paged engine."""
from __future__ import annotations

import argparse
import sys

from fastgpt2.cli.common import add_model_args, build_llm

_RULE = "=" * 40


def add_parser(sub):
    p = sub.add_parser("generate", help="generate text (conditional, unconditional or interactive)",
                       description="Generate text with GPT-2. Texar's underscore flags (--max_decoding_length, "
                                   "--top_k, --is_interactive, --config_model ...) are accepted too.")
    add_model_args(p)
    p.add_argument("--prompt", help="the context; without --prompt/--prompt-file/--interactive: unconditional")
    p.add_argument("--prompt-file", help="read the context from this file ('-' for stdin)")
    p.add_argument("--interactive", "--is_interactive", "--is-interactive", action="store_true",
                   help="REPL: type a context at 'Model input >>> ', get samples; Ctrl-D to quit")
    p.add_argument("--nsamples", type=int, default=1, help="samples per context (default 1)")
    p.add_argument("--batch-size", "--batch_size", type=int, default=1, help="samples generated together (default 1)")
    p.add_argument("--max-decoding-length", "--max_decoding_length", "--max_decoding_len", type=int, default=None,
                   help="total length, context included, as in Texar (default: 128 new tokens)")
    p.add_argument("--max-tokens", type=int, default=None, help="new tokens at most (overrides the above)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 means greedy (default 0.7)")
    p.add_argument("--top-k", "--top_k", type=int, default=40, help="default 40; 0 disables")
    p.add_argument("--top-p", "--top_p", type=float, default=None, help="nucleus sampling; replaces top-k")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable); not printed")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="print tokens as they arrive (default: on in interactive mode)")
    p.set_defaults(func=run)


def _params(args, num_context_tokens: int):
    from fastgpt2 import SamplingParams

    if args.max_tokens is not None:
        max_tokens = args.max_tokens
    elif args.max_decoding_length is not None:
        max_tokens = args.max_decoding_length - num_context_tokens
        if max_tokens < 1:
            raise ValueError(f"--max-decoding-length {args.max_decoding_length} leaves no room after the "
                             f"{num_context_tokens}-token context; it counts the context, so raise it")
    else:
        max_tokens = 128
    top_k = 0 if args.top_p is not None else args.top_k
    return SamplingParams(temperature=args.temperature, top_k=top_k, top_p=1.0 if args.top_p is None else args.top_p,
                          min_p=args.min_p, repetition_penalty=args.repetition_penalty, stop=args.stop,
                          max_tokens=max_tokens)


def _check_counts(args):
    if args.nsamples < 1 or args.batch_size < 1:
        raise ValueError(f"--nsamples and --batch-size must be >= 1, got {args.nsamples} and {args.batch_size}")
    if args.nsamples % args.batch_size:
        raise ValueError(f"--nsamples ({args.nsamples}) must be a multiple of --batch-size ({args.batch_size})")


def _samples(llm, context: str, args, stream: bool, out=sys.stdout):
    context_ids = llm.tokenizer.encode(context) if context else [llm.tokenizer.eos_token_id]
    params = _params(args, len(context_ids))
    done = 0
    while done < args.nsamples:
        if stream and args.batch_size == 1:
            print(f"{_RULE} SAMPLE {done + 1} {_RULE}", file=out)
            for piece in llm.stream(context_ids, params):
                print(piece, end="", flush=True, file=out)
            print(file=out)
            done += 1
            continue
        outs = llm.generate([context_ids] * args.batch_size, params, use_tqdm=False)
        for o in outs:
            done += 1
            print(f"{_RULE} SAMPLE {done} {_RULE}", file=out)
            print(o.outputs[0].text, file=out)
    print(_RULE * 2 + "=" * 10, file=out)


def run(args) -> int:
    _check_counts(args)
    _params(args, 0)  # validate the sampling values before loading anything
    if args.prompt is not None and args.prompt_file is not None:
        raise ValueError("give --prompt or --prompt-file, not both")
    llm = build_llm(args)
    if args.interactive:
        stream = True if args.stream is None else args.stream
        while True:
            try:
                context = input("Model input >>> ")
            except EOFError:
                print()
                return 0
            if not context.strip():
                print("Prompt should not be empty!")
                continue
            _samples(llm, context, args, stream)
    context = args.prompt or ""
    if args.prompt_file is not None:
        context = sys.stdin.read() if args.prompt_file == "-" else open(args.prompt_file, encoding="utf-8").read()
    _samples(llm, context, args, bool(args.stream))
    return 0
