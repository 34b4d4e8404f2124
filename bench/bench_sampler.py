"""Top-p sampling on the CPU: the C++ extension (native._C via cpu_sampler) against the torch reference (sort-based).

Run: python bench/bench_sampler.py [--repeats 30] [--batches 1,64] [--scales 1,3]
Prints microseconds per row of 50257 float32 logits (top_k 0, top_p 0.9, min_p 0): medians after warm-up, the
implementations alternating so that a change in machine load hits them alike; the speed-up ratios come last.
     python bench/bench_sampler.py --fast-path-table
Prints how many of 64 fresh rows per (scale, top_p) the C++ fast top-p path hands to the exact path.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from fastgpt2.kernels import cpu_sampling as cpu_sampler
from fastgpt2.kernels import native, reference

VOCAB = 50257
TOP_P = 0.9


def make_inputs(batch: int, scale: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, VOCAB, generator=g) * scale  # (B, V) float32
    return (logits, torch.zeros(batch, dtype=torch.int64), torch.full((batch,), TOP_P), torch.zeros(batch),
            torch.rand(batch, dtype=torch.float64, generator=g))


def extension_call(args, num_threads: int):
    """The compiled kernel without the Python wrapper (same arrays the wrapper passes)."""
    logits, top_k, top_p, min_p, uniform = args
    arrays = (logits.numpy(), top_k.numpy(), top_p.numpy(), min_p.numpy(), uniform.numpy())
    return lambda: cpu_sampler._C.topk_topp_minp_sample(*arrays, num_threads)


def median_and_best_seconds(fns: dict, warmup: int, repeats: int) -> dict:
    """(median, best) wall time per implementation; the implementations alternate within each repeat."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def measure(inputs, torch_threads: int, repeats: int, fns: dict) -> dict:
    """Times fns with torch set to torch_threads (set outside the timed calls: changing it is not free)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    try:
        fast = {name: fn for name, fn in fns.items() if not name.startswith("torch")}
        slow = {name: fn for name, fn in fns.items() if name.startswith("torch")}
        batch = inputs[0].shape[0]
        result = median_and_best_seconds(fast, warmup=20, repeats=repeats * (40 if batch == 1 else 1))
        result.update(median_and_best_seconds(slow, warmup=1, repeats=max(3, repeats // 5)))
        return result
    finally:
        torch.set_num_threads(previous)


def fast_path_table(scales=(0.5, 1, 3, 6, 12, 30), top_ps=(0.5, 0.9, 0.95, 0.99, 0.999, 1 - 1e-6), rows=64) -> None:
    """Rows per cell that the fast top-p path could not decide (the exact path then samples them too)."""
    stats = cpu_sampler._C._sampler_fast_path_stats
    print(f"rows of {rows} handed to the exact path (logits = randn * scale, top-p only)")
    print(f"{'scale':>8}" + "".join(f"{p:>12.6g}" for p in top_ps))
    for scale in scales:
        cells = []
        for p in top_ps:
            g = torch.Generator().manual_seed(int(scale * 100 + p * 1000))
            logits = torch.randn(rows, VOCAB, generator=g) * scale  # (B, V) float32
            before = stats()
            cpu_sampler.topk_topp_minp_sample(logits, torch.zeros(rows, dtype=torch.int64),
                                              torch.full((rows,), p, dtype=torch.float64), torch.zeros(rows),
                                              torch.rand(rows, dtype=torch.float64, generator=g), num_threads=1)
            cells.append(stats()[1] - before[1])
        print(f"{scale:>8g}" + "".join(f"{c:>12d}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast-path-table", action="store_true", help="print the fast top-p path's hand-over table")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per implementation (reference: fewer)")
    parser.add_argument("--batches", default="1,64", help="comma-separated batch sizes")
    parser.add_argument("--scales", default="1,3", help="logits = randn * scale; 1 is flat, 3 is peakier")
    args = parser.parse_args()
    all_threads = torch.get_num_threads()
    if not cpu_sampler.HAS_EXTENSION:
        print(f"the C++ extension is not in use ({native.why_no_extension()}): nothing to compare")
        raise SystemExit(2)
    if args.fast_path_table:
        fast_path_table()
        return
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"top-p {TOP_P} on (B, {VOCAB}) float32 logits; torch {torch.__version__}; all threads = {all_threads}; "
          f"load average {load} (other processes skew the medians; best = least disturbed run)")
    columns = ("C++ 1T", "C++ allT", "wrapper 1T", "torch 1T", "torch allT")
    print(f"{'logits':<10}{'B':>4}  " + "".join(f"{c:>16}" for c in columns) + "   us per row: median (best)")
    ratios = []
    for scale in [float(s) for s in args.scales.split(",")]:
        for batch in [int(b) for b in args.batches.split(",")]:
            inputs = make_inputs(batch, scale, seed=batch)
            result = measure(inputs, 1, args.repeats, {
                "C++ 1T": extension_call(inputs, 1),
                "wrapper 1T": lambda: cpu_sampler.topk_topp_minp_sample(*inputs, num_threads=1),
                "torch 1T": lambda: reference.topk_topp_minp_sample(*inputs),
            })
            result.update(measure(inputs, all_threads, args.repeats, {
                "C++ allT": extension_call(inputs, all_threads),
                "torch allT": lambda: reference.topk_topp_minp_sample(*inputs),
            }))
            per_row = {name: (median * 1e6 / batch, best * 1e6 / batch) for name, (median, best) in result.items()}
            print(f"randn*{scale:<4g}{batch:>4}  " + "".join(
                f"{per_row[c][0]:>9.1f} ({per_row[c][1]:>4.0f})" for c in columns))
            ratios.append((f"randn*{scale:g}, B={batch}", per_row["torch 1T"][0] / per_row["C++ 1T"][0],
                           per_row["torch allT"][0] / per_row["C++ allT"][0]))
    print("speed-up over the torch reference, medians (1 thread vs 1 thread; all threads vs all threads):")
    for label, one, every in ratios:
        print(f"  {label:<18} {one:7.1f}x  {every:7.1f}x")


if __name__ == "__main__":
    main()
