"""CPU benchmark: fastgpt2 vs Hugging Face transformers (decode, batch, prefill, workload, sampling).

Usage: python bench/cpu.py [--quick] [--model 124M|DIR] [--dtype float32|bfloat16] [--out DIR] [--cases ...]
The suite lives in fastgpt2/benchmarks/ so that `fastgpt2 bench` runs the same code.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fastgpt2.benchmarks.cpu import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run())
