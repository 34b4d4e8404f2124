"""The CPU suite: fastgpt2 vs Hugging Face transformers with the same weights, in one process.

Entry points: `run(argv)` (bench/cpu.py) and `add_arguments` + `main(args)` (`fastgpt2 bench`). Writes
bench/results/<machine>-<date>-<tag>.{md,json,png}; the markdown table (ratio column last) also goes to stdout.
"""
from __future__ import annotations

import argparse
import sys
import time


from fastgpt2.benchmarks import common, cpu_cases
from fastgpt2.benchmarks.cpu_report import plot, render, targets

CASES = ("decode", "batch", "sampled", "prefill", "workload", "sampling", "perplexity", "training")
SAMPLED_TOP_P = 0.9  # the sampled case: temperature 1, top-p 0.9, the batch case's sizes
# ... and one request sampled as many generation configs do (top-p 0.9 as well, prompts and tokens of the batch case)
SAMPLED_SETTINGS = {"temperature": 0.8, "repetition_penalty": 1.2}
# ... and the first batch size asking for the top-5 logprobs at every step (transformers: its raw logits of every step
# through log_softmax, topk and a gather of the sampled tokens)
SAMPLED_LOGPROBS = {"logprobs": 5}
DECODE_PROMPT_LEN = 16  # the fixed prompt length of the batch-1 decode case
# Sizes per mode. --quick must finish in < 3 minutes on 2 idle cores for 124M float32.
SIZES = {
    "quick": dict(decode_tokens=16, decode_repeats=3, batch_sizes=(16, 64), batch_prompt_len=8, batch_tokens=4,
                  batch_repeats=3, prefill_len=512, prefill_repeats=2, workload_requests=32, workload_lens=(8, 32),
                  workload_hf_batch=16, sampling_batches=(1, 64), sampling_repeats=5, perplexity_tokens=1536,
                  perplexity_stride=512, perplexity_repeats=1, training_batch=1, training_seq_len=128,
                  training_steps=4),
    "full": dict(decode_tokens=64, decode_repeats=7, batch_sizes=(16, 64), batch_prompt_len=16, batch_tokens=32,
                 batch_repeats=3, prefill_len=512, prefill_repeats=5, workload_requests=200, workload_lens=(8, 256),
                 workload_hf_batch=16, sampling_batches=(1, 64), sampling_repeats=30, perplexity_tokens=4096,
                 perplexity_stride=512, perplexity_repeats=3, training_batch=2, training_seq_len=256,
                 training_steps=5),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="fewer repeats, tokens and requests (< 3 minutes)")
    p.add_argument("--model", default="124M",
                   help="preset (random weights, nothing downloaded) or a local Hugging Face directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", default="bench/results", help="directory for the .md/.json/.png results")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--tag", default=None, help="result file tag (default: cpu-<model>-<dtype>[-quick][-<cases>])")
    p.add_argument("--peers", action="store_true",
                   help="instead of the cases: fastgpt2 beside CTranslate2 and llama.cpp (when installed) and "
                        "transformers, every precision, one table (tag peers-<model>[-quick]; --dtype/--cases unused)")
    p.add_argument("--threads", type=int, default=2, help="threads of every engine with --peers (default 2)")


def run(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench/cpu.py", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return main(parser.parse_args(argv))


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _transformers_or_exit():
    try:
        import transformers
    except ImportError:
        print("fastgpt2 bench needs transformers (the reference system): pip install -e '.[bench]'", file=sys.stderr)
        return None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def _parse_cases(text: str) -> list[str]:
    cases = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in cases if c not in CASES]
    if bad or not cases:
        raise ValueError(f"unknown case {bad[0] if bad else text!r} in --cases; choose from {','.join(CASES)}")
    return [c for c in CASES if c in cases]


def _run_cases(systems, cases: list[str], sizes: dict, results: dict, save) -> None:
    """Run each case into `results`, calling save() after every measurement so an interrupted run keeps its data."""
    from fastgpt2.benchmarks import cpu_cases

    for case in cases:
        start = time.perf_counter()
        _log(f"{case} ...")
        if case == "decode":
            results["decode"] = cpu_cases.decode(systems, 1, sizes["decode_tokens"], DECODE_PROMPT_LEN,
                                                 sizes["decode_repeats"], with_fp32=True)
        elif case == "batch":
            results["batch"] = {}
            for b in sizes["batch_sizes"]:
                results["batch"][b] = cpu_cases.decode(systems, b, sizes["batch_tokens"], sizes["batch_prompt_len"],
                                                       sizes["batch_repeats"])
                save()
        elif case == "sampled":
            results["sampled"] = {}
            for b in sizes["batch_sizes"]:
                results["sampled"][b] = cpu_cases.decode(systems, b, sizes["batch_tokens"], sizes["batch_prompt_len"],
                                                         sizes["batch_repeats"], top_p=SAMPLED_TOP_P)
                save()
            results["sampled_settings"] = {1: cpu_cases.decode(systems, 1, sizes["batch_tokens"],
                                                               sizes["batch_prompt_len"], sizes["batch_repeats"],
                                                               top_p=SAMPLED_TOP_P, sampling=SAMPLED_SETTINGS)}
            save()
            b = sizes["batch_sizes"][0]
            results["sampled_logprobs"] = {b: cpu_cases.decode(systems, b, sizes["batch_tokens"],
                                                               sizes["batch_prompt_len"], sizes["batch_repeats"],
                                                               top_p=SAMPLED_TOP_P, sampling=SAMPLED_LOGPROBS)}
            save()
        elif case == "prefill":
            results["prefill"] = cpu_cases.prefill(systems, sizes["prefill_len"], sizes["prefill_repeats"])
        elif case == "workload":
            lo, hi = sizes["workload_lens"]
            results["workload"] = cpu_cases.workload(systems, sizes["workload_requests"], lo, hi,
                                                     sizes["workload_hf_batch"])
        elif case == "sampling":
            results["sampling"] = cpu_cases.sampling(sizes["sampling_batches"], sizes["sampling_repeats"])
        elif case == "perplexity":
            from fastgpt2.benchmarks.perplexity_case import perplexity

            results["perplexity"] = perplexity(systems, sizes["perplexity_tokens"], sizes["perplexity_stride"],
                                               sizes["perplexity_repeats"])
        elif case == "training":
            from fastgpt2.train import bench as train_bench

            # One fine-tuning step (forward, backward, clipping, AdamW) of the same random-weight model against a
            # plain transformers training loop, both in this one process (fastgpt2.train shards only across ranks).
            results["training"] = train_bench.run(
                systems.llm.config, sizes["training_batch"], sizes["training_seq_len"], sizes["training_steps"],
                warmup=2, dtype="float32", device="cpu")
        _log(f"{case} done in {time.perf_counter() - start:.1f} s")
        save()


def main(args) -> int:
    wall_start = time.perf_counter()
    transformers = _transformers_or_exit()
    if transformers is None:
        return 2
    if getattr(args, "peers", False):
        from fastgpt2.benchmarks.peers import main as peers_main

        return peers_main(args, transformers)
    cases = _parse_cases(args.cases)
    sizes = SIZES["quick" if args.quick else "full"]
    info = common.machine_info()
    _log(f"{info['cpu_model']}, {info['usable_cpus']} cores, torch {info['torch']} ({info['torch_threads']} threads), "
         f"transformers {info['transformers']}; cases: {','.join(cases)}")
    bandwidth = common.copy_bandwidth()
    _log(f"copy bandwidth {bandwidth['gb_per_s']:.1f} GB/s (read+write); building the models ...")
    systems = cpu_cases.build_systems(transformers, args.model, args.dtype, with_fp32="decode" in cases)
    config = systems.llm.config
    model = systems.llm.model  # the engine may run another dtype than asked (bf16 without native bf16)
    runner = systems.llm.engine.runner
    bf16_weights = runner.cpu_step is not None and runner.cpu_step.weight_dtype == "bfloat16"
    actual = model.wte.weight
    weights = {"num_parameters": config.num_parameters(), "dtype": args.dtype,
               "fastgpt2_dtype": "bfloat16" if bf16_weights else str(actual.dtype).replace("torch.", ""),
               "fastgpt2_compute_dtype": str(actual.dtype).replace("torch.", ""),
               # bf16 weights in float32 arithmetic: the C++ step reads them at every batch size (no limit)
               "fastgpt2_bf16_weights_max_batch": None,
               "transformers_dtype": str(systems.hf.dtype).replace("torch.", "")}
    # The decode cases are greedy: with the LM head's int8 screen their steps read fewer bytes.
    per_weight, weights["greedy_screen"] = common.greedy_bytes_per_weight(
        systems.llm, 2 if bf16_weights else actual.element_size())
    weights["lm_head_weights"] = config.vocab_size * config.n_embd
    weights["bytes_per_decode_step"] = round(config.num_parameters() * per_weight)
    if weights["fastgpt2_dtype"] != args.dtype:
        _log(f"fastgpt2 runs {weights['fastgpt2_dtype']} although {args.dtype} was asked for (the engine's choice)")
    if weights["fastgpt2_compute_dtype"] != weights["fastgpt2_dtype"]:
        _log(f"fastgpt2 keeps {weights['fastgpt2_dtype']} weights and computes in {weights['fastgpt2_compute_dtype']}")
    weights["floor_ms_per_step"] = weights["bytes_per_decode_step"] / (bandwidth["gb_per_s"] * 1e9) * 1e3
    report = {"machine": info, "args": {k: v for k, v in vars(args).items() if k != "func"}, "sizes": sizes,
              "cases": cases, "bandwidth": bandwidth, "weights": weights, "results": {}}
    machine = common.machine_slug(info)
    tag = args.tag or "-".join(["cpu", common.model_slug(args.model).lower(), args.dtype] + (["quick"] if args.quick else [])
                               + ([] if len(cases) == len(CASES) else ["+".join(cases)]))
    paths = {ext: common.result_path(args.out, machine, tag, ext, info["date"]) for ext in ("md", "json", "png")}

    def save() -> str:
        report["targets"] = targets(report)
        report["wall_s"] = time.perf_counter() - wall_start
        text = render(report)
        paths["md"].parent.mkdir(parents=True, exist_ok=True)
        paths["md"].write_text(text + "\n")
        common.write_json(paths["json"], report)
        return text

    _run_cases(systems, cases, sizes, report["results"], save)
    text = save()
    note = plot(report, paths["png"])
    print(text)
    _log(f"wrote {paths['md']}, {paths['json']}" + (f", {paths['png']}" if note is None else f" ({note})"))
    _log(f"wall time {report['wall_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run())
