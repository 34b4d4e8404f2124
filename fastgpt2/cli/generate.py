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
                   help="REPL: type a context at 'Model input >>> ', get samples; Ctrl-C cancels a sample, Ctrl-D "
                        "(or Ctrl-C at the prompt) quits")
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
    p.add_argument("--ignore-eos", action="store_true", help="keep going past <|endoftext|> (as vLLM's ignore_eos)")
    p.add_argument("--beam-width", "--beam_width", type=int, default=None,
                   help="beam search with this many beams instead of sampling (transformers' num_beams; length "
                        "penalty 1, no early stopping); prints the --nsamples best with their scores")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="print tokens as they arrive, one sample after another; needs --batch-size 1 "
                        "(default: on in interactive mode with --batch-size 1)")
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
                          max_tokens=max_tokens, ignore_eos=args.ignore_eos)


def _check_counts(args):
    if args.nsamples < 1 or args.batch_size < 1:
        raise ValueError(f"--nsamples and --batch-size must be >= 1, got {args.nsamples} and {args.batch_size}")
    if args.beam_width is not None:
        _check_beam_args(args)
    if args.nsamples % args.batch_size:
        raise ValueError(f"--nsamples ({args.nsamples}) must be a multiple of --batch-size ({args.batch_size})")


def _check_beam_args(args):
    """--beam-width: --nsamples is how many of the best beams are printed; sampling-only flags are refused."""
    if args.beam_width < 1:
        raise ValueError(f"--beam-width must be >= 1, got {args.beam_width}")
    if args.nsamples > args.beam_width:
        raise ValueError(f"--nsamples ({args.nsamples}) must be at most --beam-width ({args.beam_width}): beam search "
                         f"prints the best --nsamples of its beams")
    for flag, used in (("--batch-size", args.batch_size != 1), ("--stream", bool(args.stream)),
                       ("--stop", bool(args.stop))):
        if used:
            raise ValueError(f"{flag} does not apply to beam search; drop it or drop --beam-width")


def _stream_mode(args) -> bool:
    """Whether samples are printed token by token: --stream, or --interactive unless a batch is asked for.

    A batch's samples are generated together, so none can be shown whole before the others; streaming them one after
    another would ignore --batch-size, and interleaving them would be unreadable. An explicit --stream with a batch is
    refused; interactive mode's default quietly gives way to the batch, with a note saying so.
    """
    if args.stream and args.batch_size > 1:
        raise ValueError(f"--stream prints one sample at a time, so it needs --batch-size 1 (got {args.batch_size}); "
                         f"drop --batch-size to stream the {args.nsamples} samples in turn, or drop --stream")
    if args.stream is None and args.interactive:
        if args.batch_size > 1:
            print(f"fastgpt2: note: --batch-size {args.batch_size} generates samples together, so they are printed "
                  f"when done, not streamed; use --batch-size 1 to stream", file=sys.stderr)
        return args.batch_size == 1
    return bool(args.stream)


def _read_prompt_file(path: str) -> str:
    """The file's text ('-': standard input), decoded as UTF-8 (a BOM dropped) with universal newlines."""
    name = "--prompt-file - (standard input)" if path == "-" else f"--prompt-file {path}"
    try:
        if path == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{name} does not exist; pass the path of a text file") from None
    except IsADirectoryError:
        raise ValueError(f"{name} is a directory; pass the path of a text file") from None
    except OSError as exc:
        raise ValueError(f"{name} cannot be read ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{name} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                         f"convert it to UTF-8, e.g. with iconv -t UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _samples(llm, context: str, args, stream: bool, out=None):
    out = out or sys.stdout  # looked up per call: a default of sys.stdout would keep the stream of import time
    context_ids = llm.tokenizer.encode(context) if context else [llm.tokenizer.eos_token_id]
    params = _params(args, len(context_ids))
    llm.engine.encode_prompt(context_ids)  # a prompt too long for the context fails here, before any rule is printed
    if args.beam_width is not None:
        beams = llm.beam_search(context_ids, args.beam_width, params.max_tokens, ignore_eos=args.ignore_eos,
                                n=args.nsamples)[0].outputs
        for i, beam in enumerate(beams, 1):
            print(f"{_RULE} BEAM {i} (score {beam.score:.4f}, logprob {beam.cumulative_logprob:.4f}) {_RULE}", file=out)
            print(beam.text, file=out)
        print(_RULE * 2 + "=" * 10, file=out)
        return
    done = 0
    while done < args.nsamples:
        if stream:
            print(f"{_RULE} SAMPLE {done + 1} {_RULE}", file=out)
            pieces = llm.stream(context_ids, params)
            try:
                for piece in pieces:
                    print(piece, end="", flush=True, file=out)
            finally:
                pieces.close()  # on Ctrl-C too: closing the stream aborts its request and frees its blocks
            print(file=out)
            done += 1
            continue
        outs = llm.generate([context_ids] * args.batch_size, params, use_tqdm=False)
        for o in outs:
            done += 1
            print(f"{_RULE} SAMPLE {done} {_RULE}", file=out)
            print(o.outputs[0].text, file=out)
    print(_RULE * 2 + "=" * 10, file=out)


def _interactive(llm, args, stream: bool) -> int:
    """Texar's REPL. A bad context (too long, say) prints one error line and asks again; Ctrl-C cancels the sample
    being generated and asks again; Ctrl-D or Ctrl-C at the prompt ends the session."""
    while True:
        try:
            context = input("Model input >>> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not context.strip():
            print("Prompt should not be empty!")
            continue
        try:
            _samples(llm, context, args, stream)
        except ValueError as exc:
            sys.stdout.flush()
            print(f"fastgpt2: error: {exc}", file=sys.stderr)
        except KeyboardInterrupt:
            print()


def run(args) -> int:
    # Every flag and the prompt file are checked before the model is loaded, which can take minutes.
    _check_counts(args)
    _params(args, 0)
    if args.prompt is not None and args.prompt_file is not None:
        raise ValueError("give --prompt or --prompt-file, not both")
    if args.interactive and (args.prompt is not None or args.prompt_file is not None):
        raise ValueError("--interactive reads each context at its 'Model input >>> ' prompt; drop --prompt and "
                         "--prompt-file, or drop --interactive")
    stream = _stream_mode(args) and args.beam_width is None
    context = args.prompt or ""
    if args.prompt_file is not None:
        context = _read_prompt_file(args.prompt_file)
    llm = build_llm(args)
    if args.interactive:
        return _interactive(llm, args, stream)
    _samples(llm, context, args, stream)
    return 0
