"""bench/gpu.py cannot time anything without a GPU, but its --smoke mode runs every kernel check and the end-to-end
comparison on tiny CPU shapes under the Triton interpreter, so the script cannot rot unnoticed between GPU loans."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_smoke_run():
    pytest.importorskip("transformers")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke"], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    for kernel in ("paged_decode_attention", "reshape_and_cache", "prefill_attention", "flash_attention fwd+bwd",
                   "topk_topp_minp_sample", "cross_entropy fwd+bwd"):
        line = next(l for l in out.splitlines() if l.startswith(f"| {kernel} "))
        assert line.rstrip().endswith("| yes     |"), line  # checked against the reference
    assert "| 4     |" in out  # the end-to-end table has the batch-4 row


def test_gpu_bench_without_cuda_says_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py")], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert done.returncode == 2
    assert "needs a CUDA GPU; run it with --smoke" in done.stderr
