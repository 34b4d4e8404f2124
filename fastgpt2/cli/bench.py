"""`fastgpt2 bench`: the CPU benchmark suite, fastgpt2 side by side with Hugging Face transformers."""
from __future__ import annotations


def add_parser(sub):
    from fastgpt2.benchmarks.cpu import add_arguments

    p = sub.add_parser("bench", help="benchmark fastgpt2 against transformers on the CPU (needs '.[bench]')",
                       description="Decode latency/throughput, prefill, a 200-request workload and sampling, each "
                                   "against transformers with the same weights; writes bench/results/*.")
    add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from fastgpt2.benchmarks.cpu import main

    return main(args)
