"""Torch's intra-op threads around the engine's small per-step torch work on the CPU (see OneTorchThread)."""
from __future__ import annotations

import torch

# Only OpenMP's idle threads spin, and only an OpenMP build lets the count change back and forth (torch's native
# backend warns that it cannot once parallel work has started).
_OPENMP = "parallel backend: OpenMP" in torch.__config__.parallel_info()


class OneTorchThread:
    """Runs the torch operations of its block on the calling thread alone when `device` is the CPU.

    A CPU torch operation on a logits row (50257 values: past torch's grain of 32768) runs as an OpenMP parallel
    region, after which OpenMP's idle threads spin for milliseconds (GNU OpenMP's default wait policy), taking a core
    from the C++ step that follows. On 2 cores (Intel Xeon, random 124M): at one request with top-p 0.9, a temperature
    of 0.8 cost 2.4 ms per token more than 1.0 and a repetition penalty of 1.2 2.9 ms (0.6 and 1.1 ms with
    OMP_WAIT_POLICY=PASSIVE); beam search with 4 beams 25.5 ms per step against 22.3 with it. The operations run in such
    blocks do not split a row's arithmetic between threads, so one thread computes the same values. The count is
    restored afterwards, whatever happens in the block."""

    __slots__ = ("on_cpu", "threads")

    def __init__(self, device: torch.device):
        self.on_cpu = _OPENMP and device.type == "cpu"
        self.threads = 1

    def __enter__(self):
        if self.on_cpu:
            self.threads = torch.get_num_threads()
            if self.threads > 1:
                torch.set_num_threads(1)
        return self

    def __exit__(self, *exc_info):
        if self.on_cpu and self.threads > 1:
            torch.set_num_threads(self.threads)
        return False
