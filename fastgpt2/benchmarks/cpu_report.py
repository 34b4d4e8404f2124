"""The CPU suite's report: the project's targets (PASS/MISS), the markdown text and the tokens/s plot."""
from __future__ import annotations

from fastgpt2.benchmarks import common
from fastgpt2.benchmarks.common import fmt, md_table

RATIO = "fastgpt2/transformers (speed; >1 = fastgpt2 faster)"


def _status(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _ratio(r: dict, key: str, a: str = "fastgpt2", b: str = "transformers") -> float:
    return r["systems"][a][key] / r["systems"][b][key]


def targets(report: dict) -> list[dict]:
    """The targets of the project's issue, each PASS, MISS or 'not measured' with the figures behind it."""
    res, dtype, floor_ms = report["results"], report["weights"]["dtype"], report["weights"]["floor_ms_per_step"]
    out = []

    def add(name, ok, detail):
        out.append({"target": name, "status": "not measured" if ok is None else _status(ok), "detail": detail})

    def float32_speedup(name, r, minimum, needs):
        """fastgpt2 / transformers tokens/s of result r against minimum, when r was measured in float32."""
        if r and dtype == "float32":
            x = _ratio(r, "tokens_per_s")
            add(name, x >= minimum, f"{x:.2f}x")
        else:
            add(name, None, needs)

    dec = res.get("decode")
    name = "batch-1 float32 decode <= 1.2x the bandwidth floor"
    if dec and dtype == "float32":
        ms = dec["systems"]["fastgpt2"]["ms_per_step"]
        add(name, ms <= 1.2 * floor_ms, f"{ms:.1f} ms/token = {ms / floor_ms:.2f}x the floor ({floor_ms:.1f} ms)")
    else:
        add(name, None, "needs --dtype float32 and the decode case")
    float32_speedup("batch-1 float32 decode >= 1.8x transformers tokens/s", dec, 1.8,
                    "needs --dtype float32 and the decode case")
    name = "batch-1 bfloat16 decode >= 3x transformers float32 tokens/s"
    if dec and dtype == "bfloat16" and "transformers-float32" in dec["systems"]:
        x = _ratio(dec, "tokens_per_s", b="transformers-float32")
        w = report["weights"]
        ran = w.get("fastgpt2_dtype", dtype)
        if w.get("fastgpt2_compute_dtype", ran) != ran:
            ran = f"{ran} weights in {w['fastgpt2_compute_dtype']} arithmetic"
        add(name, x >= 3.0, f"{x:.2f}x (fastgpt2 asked for bfloat16, ran {ran}, vs transformers float32)")
    else:
        add(name, None, "needs --dtype bfloat16 and the decode case")
    for batch in (16, 64):
        float32_speedup(f"{batch} concurrent float32 >= 2x transformers", (res.get("batch") or {}).get(batch), 2.0,
                        "needs --dtype float32 and the batch case")
    pre = res.get("prefill")
    float32_speedup("prefill of 512 tokens, float32, >= 1.3x transformers",
                    pre if pre and pre["prompt_len"] == 512 else None, 1.3,
                    "needs --dtype float32 and the prefill case with 512-token prompts")
    name = "200-request workload >= 2x transformers total tokens/s"
    work = res.get("workload")
    if work:
        x = _ratio(work, "tokens_per_s")
        add(name, x >= 2.0, f"{x:.2f}x with {work['num_requests']} requests ({dtype})"
            + ("" if work["num_requests"] == 200 else "; fewer than 200: indicative only"))
    else:
        add(name, None, "needs the workload case")
    name = "C++ top-p <= 50 us/row on one thread and >= 5x the torch reference"
    samp = res.get("sampling")
    if samp and samp["has_extension"] is True:
        parts, ok = [], True
        for batch, r in samp["batches"].items():
            us, ref = r["us_per_row"]["fastgpt2.cpu_sampler"], r["us_per_row"]["fastgpt2.reference"]
            ok &= us <= 50 and ref / us >= 5
            parts.append(f"B={batch}: {us:.1f} us/row, {ref / us:.1f}x the reference")
        rows = samp.get("fast_path_rows")
        if rows:
            total = rows["decided"] + rows["deferred"]
            parts.append(f"rows decided by the fast top-p path: {rows['decided']} of {total}")
        add(name, ok, "; ".join(parts))
    elif samp:
        add(name, False if samp["has_extension"] is False else None,
            f"C++ extension: {samp['has_extension']}")
    else:
        add(name, None, "needs the sampling case")
    return out


def _shape(r: dict) -> str:
    return f" ({r['prompt_len']}-token prompts, N={r['num_tokens']})"


def _rows(res: dict) -> list[list]:
    rows = []
    dec = res.get("decode")
    if dec:
        s = dec["systems"]
        rows.append([f"decode, 1 request{_shape(dec)}", "ms/token", s["fastgpt2"]["ms_per_step"], s["transformers"]["ms_per_step"],
                     _ratio(dec, "tokens_per_s")])
        if "transformers-float32" in s:
            rows.append(["decode, 1 request, vs transformers float32", "ms/token", s["fastgpt2"]["ms_per_step"],
                         s["transformers-float32"]["ms_per_step"], _ratio(dec, "tokens_per_s", b="transformers-float32")])
    for batch, r in sorted((res.get("batch") or {}).items(), key=lambda kv: int(kv[0])):
        rows.append([f"decode, {batch} concurrent{_shape(r)}", "tokens/s", r["systems"]["fastgpt2"]["tokens_per_s"],
                     r["systems"]["transformers"]["tokens_per_s"], _ratio(r, "tokens_per_s")])
    sampled = [item for key in ("sampled", "sampled_settings", "sampled_logprobs")
               for item in sorted((res.get(key) or {}).items(), key=lambda kv: int(kv[0]))]
    for batch, r in sampled:
        settings = "".join(f", {k.replace('_', ' ')} {v:g}" for k, v in (r.get("sampling") or {}).items())
        rows.append([f"decode, {batch} concurrent, top-p {r['top_p']:g}{settings} sampling{_shape(r)}", "tokens/s",
                     r["systems"]["fastgpt2"]["tokens_per_s"], r["systems"]["transformers"]["tokens_per_s"],
                     _ratio(r, "tokens_per_s")])
    pre = res.get("prefill")
    if pre:
        rows.append([f"prefill, {pre['prompt_len']}-token prompt", "tokens/s", pre["systems"]["fastgpt2"]["tokens_per_s"],
                     pre["systems"]["transformers"]["tokens_per_s"], _ratio(pre, "tokens_per_s")])
    work = res.get("workload")
    if work:
        s, (lo, hi) = work["systems"], work["len_range"]
        label = f"workload, {work['num_requests']} requests ({lo}..{hi} in, {lo}..{hi} out)"
        rows.append([label, "tokens/s", s["fastgpt2"]["tokens_per_s"], s["transformers"]["tokens_per_s"],
                     _ratio(work, "tokens_per_s")])
        for p in ("p50", "p90", "p99"):
            rows.append([f"{label}, {p} latency", "s", s["fastgpt2"][f"{p}_s"], s["transformers"][f"{p}_s"],
                         s["transformers"][f"{p}_s"] / s["fastgpt2"][f"{p}_s"]])
    ppl = res.get("perplexity")
    if ppl:
        label = f"perplexity, {ppl['num_tokens']}-token text, windows of {ppl['window_len']}, stride {ppl['stride']}"
        rows.append([label, "tokens/s", ppl["systems"]["fastgpt2"]["tokens_per_s"],
                     ppl["systems"]["transformers"]["tokens_per_s"], _ratio(ppl, "tokens_per_s")])
    train = res.get("training")
    if train:
        label = f"fine-tuning step, {train['tokens_per_step']} tokens ({train['dtype']}, one process)"
        rows.append([label, "tokens/s", train["fastgpt2_tokens_per_s"], train["transformers_tokens_per_s"],
                     train["ratio"]])
    samp = res.get("sampling")
    if samp:
        for batch, r in samp["batches"].items():
            us = r["us_per_row"]
            for impl in ("fastgpt2.cpu_sampler", "fastgpt2.reference"):
                mine = us.get(impl)
                rows.append([f"top-p sampling, batch {batch}, {impl.split('.')[1]}", "us/row",
                             mine if mine is not None else "not available", us["transformers"],
                             us["transformers"] / mine if mine else None])
    return rows


def _bytes_of(dtype: str) -> int:
    return 2 if dtype in ("bfloat16", "float16") else 4


def _fastgpt2_weight_dtype(w: dict, batch: int) -> str:
    """The weights fastgpt2 reads per step: bf16 weights in float32 arithmetic are read by the C++ step, which serves
    every step (older reports: batches up to fastgpt2_bf16_weights_max_batch, the torch model's float32 ones above)."""
    limit = w.get("fastgpt2_bf16_weights_max_batch")
    if limit is not None and batch > limit:
        return w.get("fastgpt2_compute_dtype", "float32")
    return w.get("fastgpt2_dtype", w["dtype"])


def _floor_rows(report: dict) -> list[list]:
    w, res, bw = report["weights"], report["results"], report["bandwidth"]["gb_per_s"]
    figures = []
    if res.get("decode"):
        figures.append((1, res["decode"]))
    figures += sorted(((int(b), r) for b, r in (res.get("batch") or {}).items()), key=lambda t: t[0])
    rows = []
    for batch, r in figures:
        for name, s in r["systems"].items():
            weight_bytes = w["num_parameters"] * _bytes_of(_fastgpt2_weight_dtype(w, batch) if name == "fastgpt2"
                                                           else "float32" if name == "transformers-float32"
                                                           else w.get("transformers_dtype", w["dtype"]))
            if name == "fastgpt2" and w.get("greedy_screen"):  # greedy figures: the LM head read through its screen
                weight_bytes = w["bytes_per_decode_step"]
            floor_ms = weight_bytes / (bw * 1e9) * 1e3
            rows.append([f"{name}, batch {batch}", s["ms_per_step"], s.get("best_ms_per_step"),
                         weight_bytes / s["ms_per_step"] / 1e6, floor_ms, floor_ms / s["ms_per_step"]])
    return rows


def _noisy_series(res: dict, limit: float = 1.5) -> list[str]:
    """Timing series whose slowest repeat is > limit x its fastest: the machine was busy during that case."""
    series = {}
    if res.get("decode"):
        series.update({f"decode {k}": v for k, v in res["decode"]["raw_s"].items()})
    for b, r in (res.get("batch") or {}).items():
        series.update({f"batch {b} {k}": v for k, v in r["raw_s"].items()})
    for key in ("sampled", "sampled_settings", "sampled_logprobs"):
        for b, r in (res.get(key) or {}).items():
            series.update({f"{key} {b} {k}": v for k, v in r["raw_s"].items()})
    if res.get("prefill"):
        series.update({f"prefill {k}": v for k, v in res["prefill"]["raw_s"].items()})
    for b, r in ((res.get("sampling") or {}).get("batches") or {}).items():
        series.update({f"sampling {b} {k}": v for k, v in r["raw_s"].items()})
    return [f"{name} ({max(t) / min(t):.1f}x)" for name, t in series.items() if len(t) > 1 and max(t) > limit * min(t)]


def render(report: dict) -> str:
    m, a, w, bw = report["machine"], report["args"], report["weights"], report["bandwidth"]
    lines = [
        f"# fastgpt2 vs transformers on CPU: {a['model']} {a['dtype']}{' (--quick)' if a['quick'] else ''}",
        "",
        *([f"Note: {report['note']}", ""] if report.get("note") else []),
        *([f"Asked for {a['dtype']}, fastgpt2 ran in **{w['fastgpt2_dtype']}** (the engine's choice on this CPU) and "
           f"transformers in {w.get('transformers_dtype', a['dtype'])}; the floor below is for fastgpt2's weights.", ""]
          if w.get("fastgpt2_dtype", a["dtype"]) != a["dtype"] else []),
        *([f"fastgpt2 keeps **{w['fastgpt2_dtype']} weights and computes in {w['fastgpt2_compute_dtype']}** with a "
           f"{w['fastgpt2_compute_dtype']} KV cache (this CPU has no AVX512-BF16/AMX); "
           + ("its C++ step reads the bf16 weights at every batch size." if w.get("fastgpt2_bf16_weights_max_batch")
              is None else
              f"its C++ decode step reads the bf16 weights at up to {w['fastgpt2_bf16_weights_max_batch']} sequences "
              f"per step, the torch model the {w['fastgpt2_compute_dtype']} ones above that."), ""]
          if w.get("fastgpt2_compute_dtype", w.get("fastgpt2_dtype")) != w.get("fastgpt2_dtype") else []),
        f"Machine: {m['cpu_model']}, {m['usable_cpus']} usable cores, torch {m['torch']} with {m['torch_threads']} "
        f"threads, transformers {m['transformers']}, fastgpt2 {m['fastgpt2']} (git {m['fastgpt2_git_commit']}), "
        f"Python {m['python']}, {common.machine_note(m)}, {m['date']}; 1-min load average at start "
        f"{fmt(m['load_average_1min_at_start'])}. "
        f"Wall time {report['wall_s']:.0f} s.",
        "",
        "## Bandwidth floor",
        "",
        f"Copy bandwidth {bw['gb_per_s']:.1f} GB/s: a {bw['bytes_copied'] >> 20} MiB tensor copy, counted as bytes "
        f"read + bytes written per second (2 x size / median time). A decode step reads every weight once: "
        + (f"{w['num_parameters']:,} parameters, the LM head's {w['lm_head_weights']:,} through fastgpt2's int8 screen "
           f"(greedy steps: 1 byte and a float32 scale per 32 weights, then float32 for the few rows it keeps) and the "
           f"rest at their own bytes, "
           if w.get("greedy_screen") else
           f"{w['num_parameters']:,} parameters x {w['bytes_per_decode_step'] // w['num_parameters']} bytes ")
        + f"= {w['bytes_per_decode_step'] / 1e6:.1f} MB, so the floor is {w['floor_ms_per_step']:.1f} ms per step at any "
        f"batch size (KV-cache reads not counted). Achieved GB/s = weight bytes per step x steps/s (gpt-fast's "
        f"convention); floor/actual = 1 at the floor. 'best' uses the fastest calls instead of the medians (load bursts "
        f"on a shared machine only add time); the other columns use medians.",
        "",
        md_table(["decode figure", "ms/step", "best ms/step", "achieved GB/s", "floor ms/step", "floor/actual"],
                 _floor_rows(report))
        if _floor_rows(report) else "(no decode figures: run the decode or batch case)",
        "",
        "## Targets",
        "",
        *common.target_lines(report["targets"]),
        "",
        "## Results",
        "",
        "Medians; each case alternates the systems (A B A B) after a warm-up, with fresh random prompts (no prefix-cache "
        "hits). Decode: greedy (the 'top-p sampling' rows: temperature 1 and that top-p, no top-k, for both systems), "
        "ignore EOS, prefill excluded: (T(N+1 new tokens) - T(1 new token)) / N. "
        "Workload: tokens/s of requested output tokens over the whole run; latency = finish time since all requests "
        "arrived; transformers runs fixed left-padded batches, each to its longest output. Sampling: one torch thread, "
        "top-p 0.9 over 50257 float32 logits, each timing of 16 rows after one untimed call. The last column is "
        "always a speed ratio (inverse for times).",
        "",
        md_table(["case", "unit", "fastgpt2", "transformers", RATIO], _rows(report["results"])),
    ]
    noisy = _noisy_series(report["results"])
    if noisy:
        lines[-1:-1] = ["Noisy timings (slowest repeat > 1.5x the fastest; the machine was busy, compare the 'best' "
                        "column and the raw timings in the JSON): " + ", ".join(noisy) + ".", ""]
    return "\n".join(lines)


def plot(report: dict, path) -> str | None:
    """tokens/s vs concurrency (1, 16, 64) for both systems; returns a note instead when it cannot be drawn."""
    res = report["results"]
    points = {}
    if res.get("decode"):
        points[1] = res["decode"]
    points.update({int(b): r for b, r in (res.get("batch") or {}).items()})
    if len(points) < 2:
        return "plot skipped: needs the decode and batch cases"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install -e '.[bench]')"
    xs = sorted(points)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("fastgpt2", "transformers"):
        ax.plot(xs, [points[x]["systems"][name]["tokens_per_s"] for x in xs], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("concurrent requests (transformers: batch size)")
    ax.set_ylabel("decode tokens/s (prefill excluded)")
    a = report["args"]
    ax.set_title(f"{a['model']} {a['dtype']} on {report['machine']['cpu_model']}, {report['machine']['usable_cpus']} cores")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
