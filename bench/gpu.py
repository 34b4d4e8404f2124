"""GPU benchmark: every Triton kernel (checked, timed, bandwidth vs the card's copy bandwidth) and GPT-2 decode vs
transformers on the same GPU. Results go to bench/results/<gpu>-<date>-gpu.{md,json}.

Usage: python bench/gpu.py [--model 124M|DIR] [--dtype float16|bfloat16|float32] [--skip-e2e] [--out DIR]
       python bench/gpu.py --smoke    # tiny shapes on CPU under TRITON_INTERPRET=1: checks the script only
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fastgpt2.benchmarks.gpu import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
