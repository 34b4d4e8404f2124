"""The `fastgpt2` console command: argparse subcommands, one module each."""
from __future__ import annotations

import argparse
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
        # FASTGPT2_CPU_ISA is checked when the kernels are imported, which building the parser does: a bad value is
        # the user's problem, said in one line like any other.
        import fastgpt2.kernels.native  # noqa: F401
    except (ValueError, RuntimeError) as exc:
        print(f"fastgpt2: error: {exc}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        # User-caused problems: one clear line and status 2, never a traceback. A TypeError is a bug (an argument
        # of the wrong type in the project's own calls) and keeps its traceback.
        print(f"fastgpt2: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
