"""`fastgpt2 bench --peers`: the engines a CPU user would pick instead, on the same random-weight checkpoint, in one run.

fastgpt2 (float32, bfloat16 weights, int8) and transformers float32 (the
reference) run in this process with CTranslate2 (float32, int8; peers_ct2.py); llama.cpp (f32, f16, q8_0;
peers_llama.py) runs as llama-bench / llama-batched-bench subprocesses on GGUF files converted from the same
directory. A peer that is missing gets a row saying why. Every engine uses the same thread count (2 by default).

Cases (greedy, random prompt ids): batch-1 decode ms/token, 16 and 64 concurrent decode tokens/s (prefill excluded,
(T(N+1) - T(1)) / N as in cpu_cases.decode), 512-token prefill tokens/s, and greedy agreement with transformers.
"""
from __future__ import annotations

import inspect
import sys
import tempfile
import time

import torch

from fastgpt2.benchmarks import common, cpu_cases, peers_ct2, peers_llama
from fastgpt2.benchmarks.peers_report import fill_rows, plot, render, targets

SIZES = {
    "quick": dict(decode_tokens=32, decode_prompt_len=16, decode_repeats=3, batch_sizes=(16, 64), batch_prompt_len=16,
                  batch_tokens=8, batch_repeats=2, prefill_len=512, prefill_repeats=2, check_prompts=4,
                  check_tokens=16),
    "full": dict(decode_tokens=128, decode_prompt_len=16, decode_repeats=5, batch_sizes=(16, 64), batch_prompt_len=16,
                 batch_tokens=32, batch_repeats=3, prefill_len=512, prefill_repeats=5, check_prompts=4,
                 check_tokens=32),
}
REFERENCE = "transformers float32"


def _log(message: str) -> None:
    print(f"[bench --peers] {message}", file=sys.stderr, flush=True)


def _row(engine: str, precision: str, bytes_per_weight: float, key: str | None = None, skipped: str | None = None,
         screen: bool = False):
    return {"engine": engine, "precision": precision, "bytes_per_weight": bytes_per_weight,
            "key": key or f"{engine} {precision}", "skipped": skipped, "screen": screen}


def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy continuation that never stops at <|endoftext|> (argmax of every step, KV cache kept), the
    reference the other engines are checked against; generate(min_new_tokens=...) would mask <|endoftext|> instead."""
    ids = torch.tensor(prompts)  # (batch, prompt_len): equal lengths, no padding
    out, past = [], None
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.x : 4.x
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            step = model(ids, use_cache=True, logits_to_keep=1, **{cache_kw: past})
            past = getattr(step, "cache", None) or step.past_key_values
            ids = step.logits[:, -1].argmax(-1, keepdim=True)  # (batch, 1)
            out.append(ids)
    return torch.cat(out, dim=1).tolist()


def agreement(reference: list[list[int]], tokens: list[list[int]]) -> dict:
    """Tokens equal to the reference up to each sequence's first difference, over all reference tokens."""
    matched = 0
    for ref, got in zip(reference, tokens):
        for a, b in zip(ref, got):
            if a != b:
                break
            matched += 1
    total = sum(len(r) for r in reference)
    return {"matched": matched, "total": total, "fraction": matched / total if total else None,
            "lengths": sorted({len(t) for t in tokens})}


def _fastgpt2_greedy(llm):
    from fastgpt2 import SamplingParams

    def greedy(prompts, n):
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True), use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    return greedy


def _bf16_label(llm) -> tuple[str, float]:
    """What fastgpt2 ran for dtype='bfloat16': its precision label and the bytes per weight a batch-1 step reads."""
    step = llm.engine.runner.cpu_step
    compute = str(llm.model.wte.weight.dtype).replace("torch.", "")
    if step is not None and step.weight_dtype == "bfloat16":
        return ("bfloat16" if compute == "bfloat16" else f"bfloat16 weights, {compute} compute"), 2.0
    return compute, llm.model.wte.weight.element_size()


def build_engines(systems, hf_dir: str, work_dir: str, threads: int, with_llama: bool = True):
    """The rows of the table (skipped ones say why) and, for the in-process engines, {key: object}."""
    from fastgpt2 import LLM
    from fastgpt2.benchmarks.cpu_cases import Systems

    f32_bytes, f32_screen = common.greedy_bytes_per_weight(systems.llm, 4.0)
    rows = [_row("fastgpt2", "float32", f32_bytes, key="fastgpt2", screen=f32_screen),
            _row("transformers", "float32", 4.0, key="transformers")]
    live = {"fastgpt2": systems}
    bf16 = LLM(hf_dir, device="cpu", dtype="bfloat16")
    label, nbytes = _bf16_label(bf16)
    nbytes, screen = common.greedy_bytes_per_weight(bf16, nbytes)
    rows.append(_row("fastgpt2", label, nbytes, key="fastgpt2 bfloat16", screen=screen))
    live["fastgpt2 bfloat16"] = Systems(bf16, None, None, systems.rng)
    live["fastgpt2 int8"] = Systems(LLM(hf_dir, device="cpu", dtype="float32", quantization="int8"), None, None,
                                    systems.rng)
    rows.append(_row("fastgpt2", "int8", 1.0, key="fastgpt2 int8"))
    ct2, reason = peers_ct2.available()
    for precision in peers_ct2.PRECISIONS:
        row = _row("CTranslate2", precision, peers_ct2.BYTES_PER_WEIGHT[precision], skipped=reason)
        if ct2 is not None:
            try:
                live[row["key"]] = peers_ct2.CT2Model(ct2, hf_dir, work_dir, precision, threads)
            except Exception as exc:  # noqa: BLE001 - a peer that fails is reported, not fatal
                row["skipped"] = f"conversion or loading failed: {exc}"
        rows.append(row)
    tools, reason = peers_llama.find() if with_llama else (None, "not requested")
    for precision in peers_llama.PRECISIONS:
        rows.append(_row("llama.cpp", precision, peers_llama.BYTES_PER_WEIGHT[precision], skipped=reason))
    return rows, live, tools


def _in_process_cases(systems, rows: list[dict], live: dict, sizes: dict, results: dict, save) -> None:
    """decode, batch, prefill and agreement for every engine in this process, alternating them inside each case."""
    def extra_decode(batch: int, prompt_len: int) -> dict:
        makers = {}
        for key, obj in live.items():
            if key == "fastgpt2":
                continue  # cpu_cases.decode runs fastgpt2 float32 and transformers itself
            if isinstance(obj, cpu_cases.Systems):
                makers[key] = lambda m, obj=obj: cpu_cases.fastgpt2_call(obj, batch, prompt_len, m)
            else:
                makers[key] = lambda m, obj=obj: obj.call(systems.prompts, batch, prompt_len, m)
        return makers

    start = time.perf_counter()
    results["decode"] = cpu_cases.decode(systems, 1, sizes["decode_tokens"], sizes["decode_prompt_len"],
                                         sizes["decode_repeats"], extra=extra_decode(1, sizes["decode_prompt_len"]))
    _log(f"decode done in {time.perf_counter() - start:.1f} s")
    save()
    results["batch"] = {}
    for b in sizes["batch_sizes"]:
        start = time.perf_counter()
        results["batch"][b] = cpu_cases.decode(systems, b, sizes["batch_tokens"], sizes["batch_prompt_len"],
                                               sizes["batch_repeats"], extra=extra_decode(b, sizes["batch_prompt_len"]))
        _log(f"batch {b} done in {time.perf_counter() - start:.1f} s")
        save()
    n = sizes["prefill_len"]
    extra = {key: (cpu_cases.fastgpt2_call(obj, 1, n, 1) if isinstance(obj, cpu_cases.Systems)
                   else obj.call(systems.prompts, 1, n, 1)) for key, obj in live.items() if key != "fastgpt2"}
    start = time.perf_counter()
    results["prefill"] = cpu_cases.prefill(systems, n, sizes["prefill_repeats"], extra=extra)
    _log(f"prefill done in {time.perf_counter() - start:.1f} s")
    prompts = systems.prompts(sizes["check_prompts"], sizes["decode_prompt_len"])
    reference = hf_greedy(systems.hf, prompts, sizes["check_tokens"])
    check = {"prompts": len(prompts), "prompt_len": sizes["decode_prompt_len"], "new_tokens": sizes["check_tokens"],
             "reference": REFERENCE, "engines": {}}
    for key, obj in live.items():
        greedy = _fastgpt2_greedy(obj.llm) if isinstance(obj, cpu_cases.Systems) else obj.greedy
        check["engines"][key] = agreement(reference, greedy(prompts, sizes["check_tokens"]))
    check["engines"]["transformers"] = agreement(reference, reference)
    results["agreement"] = check
    save()


def _llama_cases(tools: dict, rows: list[dict], hf_dir: str, work_dir: str, threads: int, sizes: dict,
                 results: dict, save) -> None:
    results["llama.cpp"] = {}
    for row in rows:
        if row["engine"] != "llama.cpp" or row["skipped"]:
            continue
        precision, start = row["precision"], time.perf_counter()
        try:
            gguf = peers_llama.convert(tools, hf_dir, work_dir, precision)
            fig = peers_llama.bench(tools, gguf, threads, sizes["decode_tokens"], sizes["prefill_len"],
                                    sizes["decode_repeats"])
            fig["batch"] = peers_llama.batched(tools, gguf, threads, sizes["batch_sizes"], sizes["batch_prompt_len"],
                                               sizes["batch_tokens"], sizes["batch_repeats"])
            if not tools.get("batched_bench"):
                fig["batch_note"] = "llama-batched-bench not found"
        except Exception as exc:  # noqa: BLE001 - reported in the row
            row["skipped"] = f"{precision} failed: {exc}"
            continue
        results["llama.cpp"][precision] = fig
        _log(f"llama.cpp {precision} done in {time.perf_counter() - start:.1f} s")
        save()


def run_peers(transformers, model, sizes: dict, threads: int = 2, paths: dict | None = None,
              with_llama: bool = True) -> dict:
    """Every engine on one random-weight (or loaded) checkpoint; returns the report (and writes `paths` as it goes)."""

    wall_start = time.perf_counter()
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        info = common.machine_info()
        info["ctranslate2"] = common._version("ctranslate2")
        bandwidth = common.copy_bandwidth()
        _log(f"{info['cpu_model']}, {threads} threads; copy bandwidth {bandwidth['gb_per_s']:.1f} GB/s")
        systems = cpu_cases.build_systems(transformers, model, "float32", with_fp32=False)
        config = systems.llm.config
        name = model if isinstance(model, str) else f"custom ({config.n_layer} layers x {config.n_embd})"
        report = {"machine": info, "threads": threads, "model": name, "sizes": sizes, "bandwidth": bandwidth,
                  "num_parameters": config.num_parameters(), "results": {}}

        def save() -> str:
            fill_rows(report)
            report["targets"] = targets(report)
            report["wall_s"] = time.perf_counter() - wall_start
            text = render(report)
            if paths:
                paths["md"].parent.mkdir(parents=True, exist_ok=True)
                paths["md"].write_text(text + "\n")
                common.write_json(paths["json"], report)
            return text

        with tempfile.TemporaryDirectory(prefix="fastgpt2-peers-") as work_dir:
            hf_dir = f"{work_dir}/hf"
            systems.llm.save_pretrained(hf_dir)
            rows, live, tools = build_engines(systems, hf_dir, work_dir, threads, with_llama)
            report["rows"] = rows
            _log("engines: " + ", ".join(r["key"] + (" (skipped)" if r["skipped"] else "") for r in rows))
            _in_process_cases(systems, rows, live, sizes, report["results"], save)
            if tools is not None:
                _llama_cases(tools, rows, hf_dir, work_dir, threads, sizes, report["results"], save)
        save()
        return report
    finally:
        torch.set_num_threads(torch_threads)


def main(args, transformers) -> int:
    """`fastgpt2 bench --peers [--quick] [--model M] [--out DIR] [--tag T]`."""

    sizes = SIZES["quick" if args.quick else "full"]
    info = common.machine_info()
    tag = args.tag or "-".join(["peers", common.model_slug(args.model).lower()] + (["quick"] if args.quick else []))
    paths = {ext: common.result_path(args.out, common.machine_slug(info), tag, ext, info["date"])
             for ext in ("md", "json", "png")}
    report = run_peers(transformers, args.model, sizes, threads=args.threads, paths=paths)
    note = plot(report, paths["png"])
    print(render(report))
    _log(f"wrote {paths['md']}, {paths['json']}" + (f", {paths['png']}" if note is None else f" ({note})"))
    return 0
