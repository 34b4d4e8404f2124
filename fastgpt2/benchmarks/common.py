"""Reporting shared by the benchmark suites: machine info, medians, A/B alternation, copy bandwidth, tables, files."""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch


def greedy_bytes_per_weight(llm, bytes_per_weight: float) -> tuple[float, bool]:
    """Bytes per parameter a greedy decode step of `llm` reads, and whether its LM head is screened: with the int8
    screen (csrc/argmax_screen.h) the tied head's vocab x n_embd weights cost 1 byte and a float32 scale per 32 (the
    rows it then reads at full precision are a few per 50257), the other weights their own bytes_per_weight."""
    step = llm.engine.runner.cpu_step
    if step is None or not step.greedy_screen:
        return bytes_per_weight, False
    c = llm.config
    n, head = c.num_parameters(), c.vocab_size * c.n_embd
    return ((n - head) * bytes_per_weight + head * (1 + 4 / 32)) / n, True


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo ('unknown CPU' elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _version(package: str) -> str:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # noqa: BLE001 - not installed, or installed without metadata
        return "not installed"


def _git_commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict:
    """Everything needed to compare two result files: CPU, core counts, library versions, torch threads."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    try:
        load_1min = os.getloadavg()[0]
    except OSError:
        load_1min = None
    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": affinity,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min_at_start": load_1min,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "fastgpt2": _version("fastgpt2").replace("not installed", "source checkout"),
        "fastgpt2_git_commit": _git_commit(),
        "cpu_kernels": _cpu_kernels(),
        # Variables that restrict an engine's instruction set (a run standing in for an older CPU sets them).
        "isa_overrides": {k: os.environ[k] for k in ISA_OVERRIDES if os.environ.get(k)},
        "date": datetime.date.today().isoformat(),
    }


ISA_OVERRIDES = ("FASTGPT2_CPU_ISA", "CT2_FORCE_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


def _cpu_kernels() -> str:
    """fastgpt2's C++ kernel variant in use (e.g. avx512_vnni), or why there is none."""
    try:
        from fastgpt2.kernels import native
    except Exception as exc:  # noqa: BLE001 - a forced variant this CPU cannot run, for one
        return f"none ({exc})"
    return native.ISA or "none (torch kernels)"


def machine_note(m: dict) -> str:
    """'fastgpt2 CPU kernels avx2 (instruction sets forced: FASTGPT2_CPU_ISA=avx2, ...)' for a report's machine
    line."""
    forced = ", ".join(f"{k}={v}" for k, v in (m.get("isa_overrides") or {}).items())
    note = f"fastgpt2 CPU kernels {m.get('cpu_kernels', '-')}"
    return note + (f" (instruction sets forced: {forced})" if forced else "")


def machine_slug(info: dict, use_gpu: bool = False) -> str:
    """Short file-name-safe machine name: 'amd-epyc-2c' (CPU model + usable cores) or the GPU's name."""
    if use_gpu and info.get("gpu"):
        name = info["gpu"].replace("NVIDIA", "")
    else:
        name = re.sub(r"\((R|TM)\)|CPU|Processor|@.*$|\d+-Core", "", info["cpu_model"], flags=re.I)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "machine"
    return slug if use_gpu and info.get("gpu") else f"{slug}-{info['usable_cpus']}c"


def result_path(out_dir, machine: str, tag: str, ext: str, date: str | None = None) -> Path:
    """bench/results/<machine>-<YYYY-MM-DD>-<tag>.<ext>"""
    date = date or datetime.date.today().isoformat()
    return Path(out_dir) / f"{machine}-{date}-{tag}.{ext}"


def median(values) -> float:
    return float(statistics.median(values))


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of fn takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_time(fn: Callable[[], object], warmup: int = 1, repeats: int = 5) -> tuple[float, list[float]]:
    """(median seconds, every timing) of fn over `repeats` calls after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = [timed(fn) for _ in range(repeats)]
    return median(times), times


def alternate(fns: dict[str, Callable[[], float]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Run every fn in turn (A B C A B C ...), so that drifting machine load hits every system alike.

    Each fn returns the seconds it measured (so it can prepare fresh inputs outside its timer). The warm-up rounds
    are discarded. Returns name -> list of `repeats` timings.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(fn())
    return times


def copy_bandwidth(num_bytes: int = 256 << 20, repeats: int = 7) -> dict:
    """Measured memory bandwidth of a large tensor copy (dst.copy_(src)), with torch's current thread count.

    Convention: bytes read + bytes written per second, i.e. 2 * num_bytes / median time. A decode step that streams
    every weight once reads `weight_bytes`, so its bandwidth floor is weight_bytes / this figure.
    """
    src = torch.ones(num_bytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    seconds, times = median_time(lambda: dst.copy_(src), warmup=2, repeats=repeats)
    return {"bytes_copied": num_bytes, "convention": "read+write bytes per second (2 x size / time)",
            "median_s": seconds, "times_s": times, "gb_per_s": 2 * num_bytes / seconds / 1e9}


def fmt(value, digits: int = 3) -> str:
    """Numbers for tables: 3 significant digits, thousands separators for large values, '-' for missing."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def target_lines(targets: list[dict]) -> list[str]:
    """A report's judged targets ({'target', 'status', 'detail'}) as markdown list items."""
    return [f"- **{t['status']}** {t['target']}: {t['detail']}" for t in targets]


def md_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; cells go through fmt()."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda items: "| " + " | ".join(s.ljust(w) for s, w in zip(items, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def write_json(path, obj) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    return path


def model_slug(model: str) -> str:
    from fastgpt2.model.config import canonical_preset

    return canonical_preset(model) or Path(model).name.replace(" ", "_")
