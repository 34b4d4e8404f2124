"""The one module that imports the C++ extension: the C++ paged decode attention here, the CPU sampler in
cpu_sampling.py and the engine's C++ model step (fastgpt2.engine.cpu_step) reach the compiled module through
`native._C`.

setup.py builds the extension once per x86 ISA variant (`fastgpt2._C_avx2`, `fastgpt2._C_avx2_vnni`,
`fastgpt2._C_avx512`, `fastgpt2._C_avx512_vnni`: same sources, different flags, never -march=native). At import this
module reads the CPU's features (/proc/cpuinfo on Linux), and imports as `_C` the best variant that was built and that
this CPU can run. FASTGPT2_CPU_ISA=avx2|avx2_vnni|avx512|avx512_vnni forces a variant (a clear error when the CPU
cannot run it or it was not built), FASTGPT2_CPU_ISA=none the torch path. Without AVX2 + FMA, or without any built
variant, `_C` is None and kernels built on it fall back to the torch references (said once)."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import platform
import subprocess
import sys
import warnings

import torch

from fastgpt2.kernels import reference

# Variant -> the /proc/cpuinfo flags its compile flags (setup.py's VARIANTS) need, lowest variant first. `abm` is how
# Linux spells LZCNT; AVX2 implies AVX.
_AVX2 = ("avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "abm", "popcnt")
_AVX512 = _AVX2 + ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd")
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
VARIANTS: dict[str, tuple[str, ...]] = {
    "avx2": _AVX2,
    "avx2_vnni": _AVX2 + ("avx_vnni",),
    "avx512": _AVX512,
    "avx512_vnni": _AVX512 + ("avx512_vnni", "avx512_bf16"),
} if _X86 else {"generic": ()}  # other architectures: one module on the kernels' portable paths
ENV_VAR = "FASTGPT2_CPU_ISA"
# Test hook: CPU features to treat as absent (comma-separated /proc/cpuinfo flags), to simulate an older CPU.
_HIDE_ENV_VAR = "_FASTGPT2_HIDE_CPU_FEATURES"


def _read_cpuinfo() -> tuple[frozenset[str] | None, str | None]:
    """(flags, model name) of the first processor in /proc/cpuinfo; (None, None) where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None, None
    flags, model = None, None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if flags is None and key in ("flags", "Features"):  # x86; arm64 spells it Features
            flags = frozenset(value.split())
        elif model is None and key == "model name":
            model = value.strip()
        if flags is not None and model is not None:
            break
    return flags, model


_CPU_FLAGS, _CPU_MODEL = _read_cpuinfo()
if _CPU_FLAGS is not None and os.environ.get(_HIDE_ENV_VAR):
    _CPU_FLAGS = _CPU_FLAGS - {f.strip() for f in os.environ[_HIDE_ENV_VAR].split(",")}


def cpu_features() -> frozenset[str] | None:
    """This CPU's feature flags as /proc/cpuinfo spells them (avx2, fma, avx512f, ...); None where they cannot be read
    (no /proc/cpuinfo): variants are then told apart by running their ISA probe in a child process."""
    return _CPU_FLAGS


def cpu_model_name() -> str | None:
    """The CPU's model name from /proc/cpuinfo, or None."""
    return _CPU_MODEL


def built_variants() -> list[str]:
    """Variants whose module is installed, lowest first (whether or not this CPU can run them)."""
    return [v for v in VARIANTS if importlib.util.find_spec(f"fastgpt2._C_{v}") is not None]


def missing_features(variant: str, features: frozenset[str] | None = None) -> list[str]:
    """The CPU features `variant` needs that `features` (default: this CPU's) lack; [] when it can run."""
    features = _CPU_FLAGS if features is None else features
    return [f for f in VARIANTS[variant] if f not in features]


@functools.cache
def _probe_runs(variant: str) -> bool:
    """Without readable CPU features: whether a child process can import the variant and run its ISA probe."""
    code = f"from fastgpt2 import _C_{variant} as m; m._isa_probe()"
    try:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _runnable(variant: str) -> bool:
    if _CPU_FLAGS is None:
        return _probe_runs(variant)
    return not missing_features(variant)


def available_variants() -> list[str]:
    """Variants both built and runnable on this CPU, lowest first; the last one is what import picks by default."""
    out = []
    for v in built_variants():  # lowest first: without CPU features, stop at the first probe that fails
        if not _runnable(v):
            if _CPU_FLAGS is None:
                break
            continue
        out.append(v)
    return out


def choose_variant(forced: str | None, features: frozenset[str] | None, built: list[str]) -> str | None:
    """The variant to import: `forced` (FASTGPT2_CPU_ISA; "none" for the torch path) when given, checked, else the best
    variant in `built` that a CPU with `features` runs (None for the torch path). `features` None (unknown) trusts
    `built` to hold only variants known to run. Raises ValueError for an unknown name and RuntimeError for a variant
    this CPU cannot run or that was not built."""
    if forced is not None and forced.strip():
        forced = forced.strip().lower()
        if forced == "none":
            return None
        if forced not in VARIANTS:
            raise ValueError(f"{ENV_VAR}={forced!r} is not a CPU kernel variant; expected one of "
                             f"{', '.join([*VARIANTS, 'none'])}")
        if features is not None and missing_features(forced, features):
            raise RuntimeError(f"{ENV_VAR}={forced}: this CPU cannot run the {forced} kernels, it lacks "
                               f"{', '.join(missing_features(forced, features))}")
        if forced not in built:
            raise RuntimeError(f"{ENV_VAR}={forced}: the {forced} kernels (fastgpt2._C_{forced}) were not built "
                               f"(built: {', '.join(built) or 'none'}); rebuild with `pip install -e .`")
        return forced
    runnable = [v for v in built if features is None or not missing_features(v, features)]
    return runnable[-1] if runnable else None


def load_variant(variant: str):
    """The compiled module of `variant` (fastgpt2._C_<variant>), after checking this CPU can run it. One variant per
    process: the variants register the same C++ types with pybind11, so a second one cannot be imported next to the
    first (tests run each variant in its own process, with FASTGPT2_CPU_ISA)."""
    loaded = [m for m in sys.modules if m.startswith("fastgpt2._C_") and m != f"fastgpt2._C_{variant}"]
    if loaded:
        raise RuntimeError(f"cannot load the {variant} kernels: {loaded[0]} is already loaded in this process (one "
                           f"variant per process; choose it with {ENV_VAR}={variant})")
    if _CPU_FLAGS is not None and variant in VARIANTS and missing_features(variant):
        lacking = ", ".join(missing_features(variant))
        raise RuntimeError(f"this CPU cannot run the {variant} kernels, it lacks {lacking}")
    if variant not in VARIANTS:
        raise ValueError(f"{variant!r} is not a CPU kernel variant; expected one of {', '.join(VARIANTS)}")
    return importlib.import_module(f"fastgpt2._C_{variant}")


def _select():
    """(module or None, why there is none, whether that was said with a warning)."""
    forced = os.environ.get(ENV_VAR)
    if forced is not None and forced.strip().lower() not in ("none", ""):  # checked, even before any probe
        variant = choose_variant(forced, _CPU_FLAGS, built_variants())
        if _CPU_FLAGS is None and not _probe_runs(variant):
            raise RuntimeError(f"{ENV_VAR}={variant}: this CPU cannot run the {variant} kernels (its ISA probe failed)")
        return load_variant(variant), None, False
    if forced is not None and forced.strip().lower() == "none":
        return None, f"{ENV_VAR}=none", False
    built = built_variants()
    if not built:
        return None, "the C++ extension is not built (build it with `pip install -e .`)", False
    variant = choose_variant(None, _CPU_FLAGS, available_variants() if _CPU_FLAGS is None else built)
    if variant is None:
        lacking = missing_features(built[0]) if _CPU_FLAGS is not None else ["its ISA probe failed"]
        why = (f"this CPU cannot run the C++ kernels (the lowest built variant, {built[0]}, needs "
               f"{', '.join(lacking)})")
        warnings.warn(f"fastgpt2: {why}; the CPU kernels use the slower torch path", RuntimeWarning, stacklevel=2)
        return None, why, True
    return load_variant(variant), None, False


_C, WHY_NO_EXTENSION, _SAID_AT_IMPORT = _select()

HAS_EXTENSION: bool = _C is not None
ISA: str | None = _C.ISA if _C is not None else None  # the variant in use, e.g. "avx512_vnni"


def why_no_extension() -> str:
    """Why `_C` is None (not built, FASTGPT2_CPU_ISA=none, a CPU without AVX2 + FMA); also said when a test hid it."""
    return WHY_NO_EXTENSION or "the C++ extension is not built"


def said_at_import() -> bool:
    """Whether the import already warned that the C++ kernels are not in use (a CPU without AVX2 + FMA): the kernels'
    own fallback warnings then stay silent, so that it is said once."""
    return _SAID_AT_IMPORT


@functools.cache
def _warn_no_extension() -> None:
    if said_at_import():
        return
    warnings.warn(f"fastgpt2's C++ kernels are not in use ({why_no_extension()}), so CPU decode attention uses the "
                  "slower torch reference", RuntimeWarning, stacklevel=3)


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale: float, num_threads: int | None = None):
    """reference.paged_decode_attention, in C++ for float32 CPU tensors: K/V are read in place through the block
    table (no gather copies), work split over (sequence, head). Other dtypes and devices use the reference."""
    if _C is None or q.dtype != torch.float32 or k_cache.dtype != torch.float32 or not q.is_cpu:
        if _C is None:
            _warn_no_extension()
        return reference.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)
    out = torch.empty(q.shape, dtype=q.dtype)  # C-contiguous even when q is a strided view
    _C.paged_decode_attention(
        q.contiguous().numpy(), k_cache.numpy(), v_cache.numpy(), block_tables.to(torch.int32).contiguous().numpy(),
        seq_lens.to(torch.int32).contiguous().numpy(), out.numpy(), float(scale),
        num_threads or torch.get_num_threads(),
    )
    return out


def new_cpu_step(*args):
    """The C++ model step (csrc/decode.cpp, `_C.CpuStep`); see fastgpt2.engine.cpu_step for its arguments."""
    if _C is None:
        raise RuntimeError(f"fastgpt2's C++ kernels are not in use ({why_no_extension()}); check HAS_EXTENSION before "
                           "asking for the C++ model step")
    return _C.CpuStep(*args)
