"""The `--peers` report: each row's figures from the raw cases, the markdown table and the ms/token plot."""
from __future__ import annotations

from fastgpt2.benchmarks import common
from fastgpt2.benchmarks.common import fmt, md_table


def _group(precision: str) -> str:
    """Precisions that read the same bytes per weight share a group (and a floor) in the plot."""
    if precision in ("float32", "f32"):
        return "32-bit float"
    if precision.startswith("bfloat16") or precision in ("float16", "f16"):
        return "16-bit (bf16 / f16)"
    return "8-bit (int8 / q8_0)"


NOISY = "noisy: T(N+1) <= T(1)"  # cpu_cases.decode clamps such a step to 1e-9 s; no figure is better than that one


def _step(systems: dict, key: str, field: str):
    got = systems.get(key) or {}
    if got.get("ms_per_step") is not None and got["ms_per_step"] <= 1e-5:
        return NOISY
    return got.get(field)


def fill_rows(report: dict) -> list[dict]:
    """Give every row of report['rows'] its figures (None where not measured) from report['results']."""
    res, bw = report.get("results", {}), report["bandwidth"]["gb_per_s"]
    batch_sizes = report["sizes"]["batch_sizes"]
    for row in report.get("rows", []):
        row["floor_ms"] = report["num_parameters"] * row["bytes_per_weight"] / (bw * 1e9) * 1e3
        fig = {"ms_per_token": None, "prefill_tokens_per_s": None, "agreement": None,
               "batch_tokens_per_s": {b: None for b in batch_sizes}}
        if row["engine"] == "llama.cpp":
            got = (res.get("llama.cpp") or {}).get(row["precision"]) or {}
            fig["ms_per_token"] = got.get("ms_per_token")
            fig["prefill_tokens_per_s"] = got.get("prefill_tokens_per_s")
            fig["fallback"] = got.get("fallback") or next(
                (v.get("fallback") for v in (got.get("batch") or {}).values() if v.get("fallback")), None)
            for b in batch_sizes:
                fig["batch_tokens_per_s"][b] = ((got.get("batch") or {}).get(b) or {}).get("tokens_per_s")
        elif not row["skipped"]:
            key = row["key"]
            fig["ms_per_token"] = _step((res.get("decode") or {}).get("systems", {}), key, "ms_per_step")
            for b in batch_sizes:
                sys_b = ((res.get("batch") or {}).get(b) or {}).get("systems", {})
                fig["batch_tokens_per_s"][b] = _step(sys_b, key, "tokens_per_s")
            fig["prefill_tokens_per_s"] = ((res.get("prefill") or {}).get("systems", {}).get(key) or {}).get(
                "tokens_per_s")
            fig["agreement"] = ((res.get("agreement") or {}).get("engines", {})).get(key)
        row.update(fig)
    return report.get("rows", [])


def _per_batch(values: dict | None, batch: int):
    """A concurrent column's entry: int keys in a fresh report, str keys after a JSON round trip."""
    return (values or {}).get(batch, (values or {}).get(str(batch)))


def _figure(row: dict | None, field: str, batch: int | None = None):
    """A row's measured number (None: not measured, skipped or noisy); batch: a concurrent column."""
    if not row or row.get("skipped"):
        return None
    value = row.get(field)
    if batch is not None:
        value = _per_batch(value, batch)
    return value if isinstance(value, (int, float)) and value > 0 else None


def targets(report: dict) -> list[dict]:
    """The CPU targets of the engine issues that one peers run can judge, each PASS, MISS or 'not measured' with the
    figures behind it: batch-1 decode per precision against its floor and the peers of that precision, int8 at every
    concurrency and on prefill against CTranslate2 int8, float32 concurrency and prefill against transformers.
    A target is PASS only when every figure it names was measured and met; MISS when a measured one was not."""
    rows = {r["key"]: r for r in report.get("rows", [])}
    sizes, out = report["sizes"], []

    def judge(name: str, checks: list[tuple[str, float | None, float | None, bool]]) -> None:
        """checks: (label, ours, theirs, lower_is_better) with ours / theirs compared as ours <= or >= theirs."""
        parts, ok, missing = [], True, []
        for label, ours, theirs, lower in checks:
            if ours is None or theirs is None:
                missing.append(label)
                continue
            met = ours <= theirs if lower else ours >= theirs
            ok &= met
            parts.append(f"{label}: {fmt(ours)} vs {fmt(theirs)} ({'met' if met else 'not met'})")
        parts += [f"{label}: not measured" for label in missing]
        status = "MISS" if not ok else ("not measured" if missing else "PASS")
        out.append({"target": name, "status": status, "detail": "; ".join(parts)})

    def batch1(key: str, limit: float, peers: list[str]) -> list[tuple]:
        row = rows.get(key)
        ms, floor = _figure(row, "ms_per_token"), (row or {}).get("floor_ms")
        checks = [(f"ms/token vs {limit:g}x its floor", ms, None if floor is None else limit * floor, True)]
        return checks + [(f"ms/token vs {peer}", ms, _figure(rows.get(peer), "ms_per_token"), True) for peer in peers]

    judge("batch-1 float32 decode <= 1.05x its floor, at least as fast as llama.cpp f32 and CTranslate2 float32",
          batch1("fastgpt2", 1.05, ["llama.cpp f32", "CTranslate2 float32"]))
    judge("batch-1 16-bit weights decode <= 1.1x its floor, at least as fast as llama.cpp f16",
          batch1("fastgpt2 bfloat16", 1.1, ["llama.cpp f16"]))
    judge("batch-1 int8 decode <= 1.15x its floor, at least as fast as llama.cpp q8_0 and CTranslate2 int8",
          batch1("fastgpt2 int8", 1.15, ["llama.cpp q8_0", "CTranslate2 int8"]))

    def scaled(key: str, field: str, factor: float, batch: int | None = None):
        value = _figure(rows.get(key), field, batch)
        return None if value is None else factor * value

    batches = sizes["batch_sizes"]
    judge(f"{' and '.join(map(str, batches))} concurrent float32 >= 2x transformers",
          [(f"{b} concurrent tok/s vs 2x transformers", _figure(rows.get("fastgpt2"), "batch_tokens_per_s", b),
            scaled("transformers", "batch_tokens_per_s", 2.0, b), False) for b in batches])
    judge(f"prefill of {sizes['prefill_len']} tokens, float32, >= 1.3x transformers",
          [("tok/s vs 1.3x transformers", _figure(rows.get("fastgpt2"), "prefill_tokens_per_s"),
            scaled("transformers", "prefill_tokens_per_s", 1.3), False)])
    judge(f"{' and '.join(map(str, batches))} concurrent int8 >= 1.2x CTranslate2 int8",
          [(f"{b} concurrent tok/s vs 1.2x CTranslate2 int8",
            _figure(rows.get("fastgpt2 int8"), "batch_tokens_per_s", b),
            scaled("CTranslate2 int8", "batch_tokens_per_s", 1.2, b), False) for b in batches])
    judge(f"prefill of {sizes['prefill_len']} tokens, int8, at least CTranslate2 int8's",
          [("tok/s vs CTranslate2 int8", _figure(rows.get("fastgpt2 int8"), "prefill_tokens_per_s"),
            _figure(rows.get("CTranslate2 int8"), "prefill_tokens_per_s"), False)])
    return out


def _agreement_cell(row: dict) -> str:
    a = row.get("agreement")
    if row["skipped"]:
        return "-"
    if a is None:
        return "not checked" if row["engine"] == "llama.cpp" else "-"
    return f"{a['fraction']:.0%} ({a['matched']}/{a['total']})"


def _note(row: dict) -> str:
    if row["skipped"]:
        return f"skipped: {row['skipped']}"
    notes = []
    if row["engine"] == "llama.cpp" and row.get("ms_per_token") is not None:
        notes.append("llama-bench tg/pp (decode from an empty context)")
        if row.get("fallback"):
            notes.append(f"crashed (signal), rerun with {row['fallback']}")
        if all(v is None for v in row["batch_tokens_per_s"].values()):
            notes.append("concurrency: llama-batched-bench not found")
    if row["precision"].startswith("bfloat16 weights"):
        notes.append("bf16 weights read by the C++ step, float32 arithmetic")
    if row.get("screen"):
        notes.append("greedy: the LM head screened in int8, then this precision for the rows kept (the same tokens); "
                     f"the floor counts those bytes ({row['bytes_per_weight']:.2f} per weight)")
    return "; ".join(notes)


def table(report: dict) -> str:
    sizes, rows = report["sizes"], report.get("rows", [])
    headers = ["engine", "precision", "batch-1 ms/token", "floor ms/token", "floor/actual",
               *(f"{b} concurrent tok/s" for b in sizes["batch_sizes"]), f"prefill {sizes['prefill_len']} tok/s",
               "greedy agreement with transformers", "note"]
    body = []
    for r in rows:
        ms = r.get("ms_per_token")
        body.append([r["engine"], r["precision"], ms, r["floor_ms"],
                     r["floor_ms"] / ms if isinstance(ms, (int, float)) and ms else None,
                     *(_per_batch(r["batch_tokens_per_s"], b) for b in sizes["batch_sizes"]),
                     r.get("prefill_tokens_per_s"),
                     _agreement_cell(r), _note(r)])
    return md_table(headers, body)


def render(report: dict) -> str:
    m, s, bw = report["machine"], report["sizes"], report["bandwidth"]
    llama = next(iter((report.get("results", {}).get("llama.cpp") or {}).values()), {})
    check = report.get("results", {}).get("agreement")
    lines = [
        f"# CPU engines side by side: GPT-2 {report['model']} (random weights), {report['threads']} threads each",
        "",
        f"CPU: **{m['cpu_model']}** ({m['usable_cpus']} usable cores). torch {m['torch']}, transformers "
        f"{m['transformers']}, CTranslate2 {m.get('ctranslate2', '-')}, llama.cpp "
        f"{llama.get('build_commit', '-')} (build {llama.get('build_number', '-')}), fastgpt2 {m['fastgpt2']} "
        f"(git {m['fastgpt2_git_commit']}), {common.machine_note(m)}, {m['date']}; 1-min load average at start "
        f"{fmt(m['load_average_1min_at_start'])}; wall time {report.get('wall_s', 0):.0f} s.",
        "",
        f"Floor = {report['num_parameters']:,} parameters x bytes per weight of the precision / copy bandwidth "
        f"{bw['gb_per_s']:.1f} GB/s (a {bw['bytes_copied'] >> 20} MiB tensor copy, read + write bytes per second); "
        f"q8_0 counts 34 bytes per 32 weights, int8 one byte (scales not counted); KV-cache reads not counted. "
        f"floor/actual = 1 at the floor.",
        "",
        f"Batch-1 decode: {s['decode_tokens']} new tokens after a {s['decode_prompt_len']}-token prompt; concurrent: "
        f"{s['batch_tokens']} new tokens after {s['batch_prompt_len']}-token prompts; in-process engines: (median "
        f"T(N+1) - median T(1)) / N, prefill excluded, the engines alternating (A B C ...) after a warm-up, "
        f"{s['decode_repeats']} / {s['batch_repeats']} repeats. Prefill: one {s['prefill_len']}-token prompt, "
        f"{s['prefill_repeats']} repeats (fastgpt2 and CTranslate2: generate 1 token; transformers: one forward, "
        f"last-position logits). llama.cpp runs after them as subprocesses: llama-bench tg{s['decode_tokens']} "
        f"(from an empty context) and pp{s['prefill_len']}, medians of its per-repeat samples; "
        f"llama-batched-bench S_TG (generation only) for the concurrent columns.",
        "",
    ]
    if check:
        lines += [f"Greedy agreement: {check['prompts']} prompts of {check['prompt_len']} tokens, "
                  f"{check['new_tokens']} new tokens each, none stopping at <|endoftext|>; the share of tokens equal to "
                  f"{check['reference']}'s (argmax every step) up to each sequence's first difference. llama-bench "
                  f"returns no tokens, so llama.cpp is not checked.", ""]
    lines.append(table(report))
    if report.get("targets"):
        lines += ["", f"Targets on this CPU ({m['cpu_model']}, fastgpt2 kernels {m.get('cpu_kernels', '-')}):", "",
                  *common.target_lines(report["targets"])]
    return "\n".join(lines)


def plot(report: dict, path) -> str | None:
    """Batch-1 ms/token by precision group and engine (bars) with each group's floor (a dashed line)."""
    rows = [r for r in report.get("rows", []) if isinstance(r.get("ms_per_token"), (int, float))]
    if not rows:
        return "plot skipped: no batch-1 figures"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install -e '.[bench]')"
    groups = sorted({_group(r["precision"]) for r in rows}, key=lambda g: ("32", "16", "8-").index(g[:2]))
    engines = list(dict.fromkeys(r["engine"] for r in rows))
    width = 0.8 / len(engines)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, engine in enumerate(engines):
        for gi, group in enumerate(groups):
            for r in rows:
                if r["engine"] == engine and _group(r["precision"]) == group:
                    x = gi - 0.4 + width * (i + 0.5)
                    ax.bar(x, r["ms_per_token"], width, color=f"C{i}", label=engine if gi == groups.index(
                        next(_group(q["precision"]) for q in rows if q["engine"] == engine)) else None)
                    ax.annotate(r["precision"].split(",")[0], (x, r["ms_per_token"]), ha="center", va="bottom",
                                fontsize=6, rotation=90)
    for gi, group in enumerate(groups):
        floor = min(r["floor_ms"] for r in rows if _group(r["precision"]) == group)
        ax.hlines(floor, gi - 0.45, gi + 0.45, colors="k", linestyles="dashed",
                  label="bandwidth floor" if gi == 0 else None)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("batch-1 decode ms/token (lower is better)")
    m = report["machine"]
    ax.set_title(f"GPT-2 {report['model']}, {report['threads']} threads, {m['cpu_model']}", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def main(argv: list[str] | None = None) -> int:
    """`python -m fastgpt2.benchmarks.peers_report RESULT.json ...`: the targets of saved peers results."""
    import json
    import sys

    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print("usage: python -m fastgpt2.benchmarks.peers_report bench/results/<...>-peers-<...>.json ...")
        return 2
    for path in paths:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
        if "rows" not in report or "sizes" not in report:
            print(f"{path}: not a `fastgpt2 bench --peers` result (no rows)")
            return 1
        machine = report["machine"]
        print(f"{path} ({machine['cpu_model']}, fastgpt2 kernels {machine.get('cpu_kernels', '-')}):")
        print("\n".join(common.target_lines(targets(report))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
