"""The `fastgpt2` console command: argparse subcommands, one module each."""
from __future__ import annotations

import argparse
import os
import sys


class _Parser(argparse.ArgumentParser):
    """Exit status 2 with one line on bad arguments (argparse's usage dump is noise for a bad value)."""

    def error(self, message):
        self.exit(2, f"fastgpt2: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from fastgpt2.cli import info

    parser = _Parser(prog="fastgpt2", description="A fast GPT-2 engine.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for module in _subcommand_modules():
        module.add_parser(sub)
    return parser


def _subcommand_modules():
    import importlib

    modules = []
    for name in ("info", "generate", "perplexity", "lm_eval_cli", "bench", "convert", "finetune", "prepare_data"):
        try:
            modules.append(importlib.import_module(f"fastgpt2.cli.{name}"))
        except ModuleNotFoundError as exc:
            if exc.name != f"fastgpt2.cli.{name}":
                raise
    return modules


def main(argv=None) -> int:
    try:
        parser = build_parser()
    except (ValueError, RuntimeError) as exc:
        # Building the parser imports the kernels, which check FASTGPT2_CPU_ISA: a bad value is the user's problem,
        # said in one line like any other. Anything else is a bug and keeps its traceback.
        if not str(exc).startswith("FASTGPT2_CPU_ISA"):
            raise
        print(f"fastgpt2: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        # User-caused problems: one clear line and status 2, never a traceback. A TypeError is a bug (an argument
        # of the wrong type in the project's own calls) and keeps its traceback.
        print(f"fastgpt2: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`fastgpt2 info | head -3`): stop quietly, as other command-line tools do; stdout goes
        # to /dev/null so that the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
