"""llama.cpp for `fastgpt2 bench --peers`: finds the binaries and the converter, converts the benchmark's Hugging Face
directory to GGUF (f32, f16, q8_0) and runs llama-bench (decode, prefill) and llama-batched-bench (concurrency).

Nothing of llama.cpp ships with fastgpt2: `llama-bench` is looked up in $LLAMA_BENCH, then on PATH;
`llama-batched-bench` next to it, then on PATH; the converter is $LLAMA_CPP_DIR/convert_hf_to_gguf.py (it imports
the gguf-py package vendored beside it). README's bench section gives the build commands.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from fastgpt2.benchmarks.common import median

PRECISIONS = ("f32", "f16", "q8_0")  # converter --outtype values
BYTES_PER_WEIGHT = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32}  # q8_0: blocks of 32 int8 + one fp16 scale


def find() -> tuple[dict | None, str | None]:
    """({'bench', 'batched_bench' or None, 'converter'}, None) or (None, the reason llama.cpp is skipped)."""
    bench = os.environ.get("LLAMA_BENCH") or shutil.which("llama-bench")
    if not bench or not os.access(bench, os.X_OK):
        where = f"$LLAMA_BENCH={bench} is not executable" if os.environ.get("LLAMA_BENCH") else "llama-bench not found"
        return None, f"{where} (set $LLAMA_BENCH or put it on PATH; see README)"
    sibling = Path(bench).with_name("llama-batched-bench")
    batched = str(sibling) if os.access(sibling, os.X_OK) else shutil.which("llama-batched-bench")
    root = os.environ.get("LLAMA_CPP_DIR")
    converter = Path(root) / "convert_hf_to_gguf.py" if root else None
    if converter is None or not converter.is_file():
        return None, "convert_hf_to_gguf.py not found (set $LLAMA_CPP_DIR to the llama.cpp source tree; see README)"
    return {"bench": bench, "batched_bench": batched, "converter": str(converter)}, None


def _run(cmd: list[str], timeout: float, fallback: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run cmd; if it dies from a signal and a fallback is given, run cmd + fallback once (the result's `fallback`
    attribute says which ran). A build with -march=native on a CPU whose AMX tiles the OS does not grant crashes in
    ggml's AMX path (repacked weights); turning weight repacking off avoids it, so that is the fallback used here."""
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    out.fallback = None
    if out.returncode < 0 and fallback:
        out = subprocess.run(cmd + fallback, capture_output=True, text=True, timeout=timeout)
        out.fallback = " ".join(fallback)
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{Path(cmd[0]).name if cmd[0] != sys.executable else cmd[1]} failed "
                           f"(exit {out.returncode}): {' | '.join(tail)}")
    return out


def convert(tools: dict, hf_dir: str, out_dir: str, precision: str) -> str:
    """The GGUF file of hf_dir in `precision` (one of PRECISIONS), written by llama.cpp's own converter."""
    path = str(Path(out_dir) / f"model-{precision}.gguf")
    _run([sys.executable, tools["converter"], hf_dir, "--outtype", precision, "--outfile", path], timeout=1800)
    return path


def bench(tools: dict, gguf: str, threads: int, decode_tokens: int, prefill_len: int, repeats: int) -> dict:
    """llama-bench's pp<prefill_len> (prefill tokens/s) and tg<decode_tokens> (batch-1 decode, from an empty context)
    as medians of its per-repeat samples, plus the build and CPU it reports."""
    out = _run([tools["bench"], "-m", gguf, "-p", str(prefill_len), "-n", str(decode_tokens), "-t", str(threads),
                "-r", str(repeats), "-o", "json"], timeout=3600, fallback=["--repack", "0"])
    rows = json.loads(out.stdout)
    result = {"command": "llama-bench", "raw": rows, "fallback": out.fallback}
    for row in rows:
        tps = median(row.get("samples_ts") or [row["avg_ts"]])
        if row.get("n_gen", 0) == 0:
            result["prefill_tokens_per_s"] = tps
        elif row.get("n_prompt", 0) == 0:
            result["ms_per_token"] = 1e3 / tps
            result["tokens_per_s"] = tps
        result.update({k: row[k] for k in ("build_commit", "build_number", "cpu_info", "backends", "type_k")
                       if k in row})
    return result


def batched(tools: dict, gguf: str, threads: int, batch_sizes, prompt_len: int, new_tokens: int,
            repeats: int) -> dict:
    """llama-batched-bench's S_TG (generated tokens of all sequences / generation time: prefill excluded) per batch
    size, the median of `repeats` runs; {} when llama-batched-bench was not built."""
    if not tools.get("batched_bench"):
        return {}
    ctx = max(batch_sizes) * (prompt_len + new_tokens) + 64
    cmd = [tools["batched_bench"], "-m", gguf, "-c", str(ctx), "-b", "2048", "-ub", "512", "-t", str(threads),
           "-npp", str(prompt_len), "-ntg", str(new_tokens), "-npl", ",".join(map(str, batch_sizes)),
           "--output-format", "jsonl"]
    speeds: dict[int, list[float]] = {b: [] for b in batch_sizes}
    for _ in range(repeats):
        out = _run(cmd, timeout=3600, fallback=["--no-repack"])
        for line in (out.stdout + "\n" + out.stderr).splitlines():
            if line.startswith("{") and '"speed_tg"' in line:
                row = json.loads(line)
                speeds.setdefault(int(row["pl"]), []).append(float(row["speed_tg"]))
    return {b: {"tokens_per_s": median(v), "raw_tokens_per_s": v, "fallback": out.fallback}
            for b, v in speeds.items() if v}
