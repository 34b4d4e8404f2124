"""`fastgpt2 lm-eval ...`: lm-evaluation-harness' own command line with the `fastgpt2` backend registered first, for
lm-eval releases that do not discover backends through the `lm_eval.models` entry point."""
from __future__ import annotations

import argparse
import sys


def add_parser(sub):
    # Every argument, -h included, belongs to lm-eval: with no '-' among its prefix characters this parser takes
    # them all as the one positional.
    p = sub.add_parser("lm-eval", add_help=False, prefix_chars="\0",
                       help="run lm-evaluation-harness with --model fastgpt2 (needs '.[eval]'); arguments as lm-eval's",
                       description="Hands every argument to lm-eval's command line after registering `fastgpt2`.")
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        raise ValueError("fastgpt2 lm-eval needs lm-evaluation-harness: pip install -e '.[eval]'") from None
    import fastgpt2.eval.lm_eval_backend  # noqa: F401 - registers the `fastgpt2` model

    argv = sys.argv
    sys.argv = ["lm-eval", *args.lm_eval_args]  # lm-eval's parser reads sys.argv
    try:
        cli_evaluate()
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    finally:
        sys.argv = argv
    return 0
