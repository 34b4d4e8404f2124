"""GPU benchmark (bench/gpu.py): every Triton kernel checked against its torch reference and timed with
triton.testing.do_bench (median), with its achieved bandwidth against the card's measured device-to-device copy
bandwidth; then GPT-2 decode side by side with transformers' generate on the same GPU, in the same run.

Writes <out>/<gpu>-<date>-gpu.{md,json}. `--smoke` runs tiny shapes on CPU under TRITON_INTERPRET=1: it checks that
the script and every kernel run end to end; its times mean nothing.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

import torch  # noqa: E402

from fastgpt2.benchmarks.common import (  # noqa: E402
    machine_info, machine_slug, md_table, median_time, result_path, write_json,
)
from fastgpt2.kernels import reference  # noqa: E402

# Shapes: (full run on the GPU, smoke run on CPU).
SHAPES = {
    "decode": (dict(batch=64, context=1024, heads=12, head_dim=64, block_size=16),
               dict(batch=3, context=40, heads=2, head_dim=64, block_size=16)),
    "cache_write": (dict(tokens=4096, heads=12, head_dim=64, block_size=16),
                    dict(tokens=20, heads=2, head_dim=64, block_size=16)),
    "prefill": (dict(prompts=8, prompt_len=512, heads=12, head_dim=64, block_size=16),
                dict(prompts=2, prompt_len=20, heads=2, head_dim=64, block_size=16)),
    "flash": (dict(batch=8, heads=12, seq_len=1024, head_dim=64), dict(batch=1, heads=2, seq_len=40, head_dim=64)),
    "sampling": (dict(batch=256, vocab=50257), dict(batch=4, vocab=1000)),
    "cross_entropy": (dict(rows=8192, vocab=50257), dict(rows=8, vocab=1000)),
}


def _shape(name: str) -> dict:
    return SHAPES[name][1 if SMOKE else 0]


def bench_ms(fn) -> float:
    """Median milliseconds of fn: triton.testing.do_bench on CUDA, a plain timer in smoke mode."""
    if SMOKE:
        return median_time(fn, warmup=1, repeats=3)[0] * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_bandwidth(device) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read + written (the CPU suite's convention)."""
    num_bytes = (1 << 30) if not SMOKE else (16 << 20)
    src = torch.ones(num_bytes // 2, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    return 2 * num_bytes / (bench_ms(lambda: dst.copy_(src)) * 1e-3)


def _row(name, shape, ms, num_bytes, copy_bps, max_err, tol, flops=None) -> dict:
    gbps = num_bytes / (ms * 1e-3) / 1e9
    return {"kernel": name, "shape": shape, "ms": ms, "bytes": num_bytes, "gb_per_s": gbps,
            "fraction_of_copy": gbps * 1e9 / copy_bps, "tflops": None if flops is None else flops / (ms * 1e-3) / 1e12,
            "max_abs_err": max_err, "tolerance": tol, "correct": bool(max_err <= tol)}


def _paged_pool(num_seqs, context, heads, head_dim, block_size, dtype, device, gen):
    """A shuffled pool holding num_seqs contexts of `context` tokens: (k_cache, v_cache, block_tables, seq_lens)."""
    blocks_per_seq = -(-context // block_size)
    num_blocks = num_seqs * blocks_per_seq + 1
    k_cache = torch.randn(num_blocks, block_size, heads, head_dim, generator=gen).to(device, dtype)
    v_cache = torch.randn(num_blocks, block_size, heads, head_dim, generator=gen).to(device, dtype)
    tables = torch.randperm(num_blocks, generator=gen)[: num_seqs * blocks_per_seq].view(num_seqs, blocks_per_seq)
    seq_lens = torch.full((num_seqs,), context, dtype=torch.int32)
    return k_cache, v_cache, tables.int().to(device), seq_lens.to(device)


def kernel_rows(device, dtype, copy_bps) -> list[dict]:
    from fastgpt2.kernels import cross_entropy as ce
    from fastgpt2.kernels import flash_attention as fa
    from fastgpt2.kernels import paged_attention as pa
    from fastgpt2.kernels import prefill_attention as pf
    from fastgpt2.kernels import sampling as sp

    gen = torch.Generator().manual_seed(0)
    size = torch.tensor([], dtype=dtype).element_size()
    rows = []

    # 1. Paged decode attention: reads every cached K/V once.
    s = _shape("decode")
    k_cache, v_cache, tables, lens = _paged_pool(s["batch"], s["context"], s["heads"], s["head_dim"],
                                                 s["block_size"], dtype, device, gen)
    q = torch.randn(s["batch"], s["heads"], s["head_dim"], generator=gen).to(device, dtype)
    scale = s["head_dim"] ** -0.5
    out = pa.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)
    err = (out.float() - reference.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale).float()).abs().max()
    ms = bench_ms(lambda: pa.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale))
    num_bytes = 2 * s["batch"] * s["context"] * s["heads"] * s["head_dim"] * size
    rows.append(_row("paged_decode_attention", s, ms, num_bytes, copy_bps, float(err), 2e-2))

    # 2. KV cache write: reads and writes N * H * D * 2 elements.
    s = _shape("cache_write")
    kc = torch.zeros(-(-s["tokens"] // s["block_size"]) + 1, s["block_size"], s["heads"], s["head_dim"],
                     device=device, dtype=dtype)
    vc, kc_ref, vc_ref = kc.clone(), kc.clone(), kc.clone()
    k = torch.randn(s["tokens"], s["heads"], s["head_dim"], generator=gen).to(device, dtype)
    v = torch.randn(s["tokens"], s["heads"], s["head_dim"], generator=gen).to(device, dtype)
    slots = torch.randperm(kc.shape[0] * s["block_size"], generator=gen)[: s["tokens"]].to(device)
    pa.reshape_and_cache(k, v, kc, vc, slots)
    reference.reshape_and_cache(k, v, kc_ref, vc_ref, slots)
    err = max((kc - kc_ref).abs().max().item(), (vc - vc_ref).abs().max().item())
    ms = bench_ms(lambda: pa.reshape_and_cache(k, v, kc, vc, slots))
    rows.append(_row("reshape_and_cache", s, ms, 4 * k.numel() * size, copy_bps, err, 0.0))

    # 3. Prefill attention over the paged cache (no prefix): causal, packed prompts.
    s = _shape("prefill")
    n, t = s["prompts"], s["prompt_len"]
    k_cache, v_cache, tables, lens = _paged_pool(n, t, s["heads"], s["head_dim"], s["block_size"], dtype, device, gen)
    q = torch.randn(n * t, s["heads"], s["head_dim"], generator=gen).to(device, dtype)
    cu = torch.arange(0, (n + 1) * t, t, dtype=torch.int32, device=device)
    run = lambda: pf.prefill_attention(q, k_cache, v_cache, cu, lens, tables, scale, max_seqlen_q=t)  # noqa: E731
    expected = reference.prefill_attention(q, k_cache, v_cache, cu, lens, tables, scale, max_seqlen_q=t)
    err = (run().float() - expected.float()).abs().max().item()
    flops = 2 * 2 * n * s["heads"] * s["head_dim"] * t * t / 2  # QK^T and PV over the causal half
    rows.append(_row("prefill_attention", s, bench_ms(run), 4 * q.numel() * size, copy_bps, err, 2e-2, flops))

    # 4. Flash attention forward and forward+backward (dense, causal).
    s = _shape("flash")
    shape = (s["batch"], s["heads"], s["seq_len"], s["head_dim"])
    qkv = [torch.randn(shape, generator=gen).to(device, dtype).requires_grad_() for _ in range(3)]
    out = fa.flash_attention(*qkv, causal=True)
    err = (out.float() - reference.flash_attention(*qkv, causal=True).float()).abs().max().item()
    grad = torch.randn_like(out)
    flops = 2 * 2 * s["batch"] * s["heads"] * s["head_dim"] * s["seq_len"] ** 2 / 2
    with torch.no_grad():
        ms = bench_ms(lambda: fa.flash_attention(*qkv, causal=True))
    rows.append(_row("flash_attention fwd", s, ms, 4 * out.numel() * size, copy_bps, err, 2e-2, flops))
    ms = bench_ms(lambda: fa.flash_attention(*qkv, causal=True).backward(grad))
    rows.append(_row("flash_attention fwd+bwd", s, ms, 8 * out.numel() * size, copy_bps, err, 2e-2, 3.5 * flops))

    # 5. Fused top-p sampling: exact ids against the reference with the same uniforms; reads the logits once.
    s = _shape("sampling")
    logits = (torch.randn(s["batch"], s["vocab"], generator=gen) * 3).to(device)
    b = s["batch"]
    params = (torch.zeros(b, dtype=torch.int64, device=device), torch.full((b,), 0.9, device=device),
              torch.zeros(b, device=device), torch.rand(b, generator=gen).to(device))
    ids = sp.topk_topp_minp_sample(logits, *params)
    mismatches = int((ids != reference.topk_topp_minp_sample(logits, *params)).sum())
    ms = bench_ms(lambda: sp.topk_topp_minp_sample(logits, *params))
    rows.append(_row("topk_topp_minp_sample (top-p 0.9)", s, ms, logits.numel() * 4, copy_bps, mismatches, 0))

    # 6. Fused cross-entropy: loss forward (reads the logits once) and loss + gradient.
    s = _shape("cross_entropy")
    logits = torch.randn(s["rows"], s["vocab"], generator=gen).to(device, dtype).requires_grad_()
    targets = torch.randint(0, s["vocab"], (s["rows"],), generator=gen).to(device)
    loss = ce.cross_entropy(logits, targets)
    err = abs(loss.item() - reference.cross_entropy(logits, targets).item())
    with torch.no_grad():
        ms = bench_ms(lambda: ce.cross_entropy(logits, targets))
    rows.append(_row("cross_entropy fwd", s, ms, logits.numel() * size, copy_bps, err, 1e-3))
    ms = bench_ms(lambda: ce.cross_entropy(logits, targets).backward())
    rows.append(_row("cross_entropy fwd+bwd", s, ms, 3 * logits.numel() * size, copy_bps, err, 1e-3))
    return rows


def end_to_end(device, dtype_name: str, model: str, quick: bool) -> dict:
    """GPT-2 greedy decode, fastgpt2 (CUDA graphs) vs transformers' generate with the same weights, same GPU."""
    from fastgpt2.benchmarks import cpu_cases
    from fastgpt2.benchmarks.cpu import _transformers_or_exit
    from fastgpt2.benchmarks.cpu_cases import build_systems

    transformers = _transformers_or_exit()
    systems = build_systems(transformers, model, dtype_name, with_fp32=False, device=str(device))
    tokens, repeats = (4, 2) if quick else (64, 5)
    results = {}
    for batch in ((1, 4) if SMOKE else (1, 64, 256)):
        start = time.perf_counter()
        results[batch] = cpu_cases.decode(systems, batch, tokens, 16, repeats)
        print(f"[gpu bench] decode batch {batch} done in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return results


def targets(kernels: list[dict], e2e: dict, copy_bps: float) -> list[str]:
    by_name = {r["kernel"]: r for r in kernels}
    lines = []
    d = by_name["paged_decode_attention"]
    lines.append(("PASS" if d["fraction_of_copy"] >= 0.7 else "MISS") +
                 f" paged decode attention >= 70% of copy bandwidth at context 1024, batch 64: "
                 f"{d['fraction_of_copy']:.0%} ({d['gb_per_s']:.0f} GB/s)")
    s = by_name["topk_topp_minp_sample (top-p 0.9)"]
    read_ms = s["bytes"] / copy_bps * 1e3
    lines.append(("PASS" if s["ms"] <= 2 * read_ms else "MISS") +
                 f" fused top-p on (256, 50257) within 2x of reading the logits once: {s['ms'] / read_ms:.2f}x")
    for batch, want in ((1, 5.0), (64, 10.0)):
        if batch in e2e:
            sy = e2e[batch]["systems"]
            ratio = sy["fastgpt2"]["tokens_per_s"] / sy["transformers"]["tokens_per_s"]
            lines.append(("PASS" if ratio >= want else "MISS") +
                         f" end-to-end decode at batch {batch} >= {want:g}x transformers: {ratio:.2f}x")
    return lines


def render(info: dict, copy_bps: float, kernels: list[dict], e2e: dict, target_lines: list[str]) -> str:
    head = [f"# fastgpt2 GPU benchmark: {info.get('gpu') or 'CPU (smoke run: times mean nothing)'}", "",
            f"torch {info['torch']}, transformers {info['transformers']}, commit {info['fastgpt2_git_commit']}, "
            f"{info['date']}. Device-to-device copy bandwidth: {copy_bps / 1e9:.0f} GB/s (read + write).", ""]
    krows = [[r["kernel"], str(r["shape"]), r["ms"], r["gb_per_s"], f"{r['fraction_of_copy']:.0%}",
              r["tflops"], r["max_abs_err"], "yes" if r["correct"] else "NO"] for r in kernels]
    table = md_table(["kernel", "shape", "median ms", "GB/s", "of copy BW", "TFLOP/s", "max err", "correct"], krows)
    erows = []
    for batch, res in e2e.items():
        sy = res["systems"]
        f, h = sy["fastgpt2"], sy["transformers"]
        erows.append([batch, f["ms_per_step"], h["ms_per_step"], f["tokens_per_s"], h["tokens_per_s"],
                      f["tokens_per_s"] / h["tokens_per_s"]])
    etable = md_table(["batch", "fastgpt2 ms/step", "transformers ms/step", "fastgpt2 tok/s", "transformers tok/s",
                       "speed ratio"], erows)
    return "\n".join(head + ["## Kernels", "", table, "", "## End-to-end decode (greedy, prefill excluded)", "",
                             etable, "", "## Targets", ""] + [f"- {t}" for t in target_lines]) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET (checks only)")
    p.add_argument("--model", default="124M", help="preset (random weights) or local Hugging Face directory")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--skip-e2e", action="store_true", help="kernels only")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    if not SMOKE and not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU; run it with --smoke to check it on CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if SMOKE else "cuda")
    dtype = torch.float32 if SMOKE else getattr(torch, args.dtype)
    info = machine_info()
    copy_bps = copy_bandwidth(device)
    kernels = kernel_rows(device, dtype, copy_bps)
    if SMOKE:
        from fastgpt2 import GPT2Config

        model = GPT2Config(n_layer=2, n_embd=64, n_head=2)
    else:
        model = args.model
    e2e = {} if args.skip_e2e else end_to_end(device, "float32" if SMOKE else args.dtype, model, quick=SMOKE)
    lines = targets(kernels, e2e, copy_bps) if not SMOKE else ["(smoke run: no targets judged)"]
    report = render(info, copy_bps, kernels, e2e, lines)
    print(report)
    if not SMOKE:
        slug = machine_slug(info, use_gpu=True)
        md = result_path(args.out, slug, "gpu", "md")
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(report)
        write_json(result_path(args.out, slug, "gpu", "json"),
                   {"machine": info, "copy_bandwidth_bytes_per_s": copy_bps, "kernels": kernels, "end_to_end": e2e})
        print(f"[gpu bench] wrote {md}", file=sys.stderr)
    return 0 if all(r["correct"] for r in kernels) else 1
