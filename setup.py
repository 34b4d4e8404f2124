"""fastgpt2 packaging: the Python package plus the optional pybind11 CPU kernel extensions.

The extension works on raw buffers and does not link against libtorch, so one build serves any torch
version. It is built once per x86 ISA variant (VARIANTS below: `fastgpt2._C_avx2`, `fastgpt2._C_avx512`, ...), every
variant from the same sources with its own flags, never -march=native: an install runs on any x86-64 CPU, and
fastgpt2/kernels/native.py imports the best variant this CPU can run (the torch path on a CPU without AVX2 + FMA).
One shared object per variant keeps each module's code, inline std:: functions included, on one set of ISA flags.
When a variant cannot be compiled, installation still succeeds without it (it says so); with no variant at all the
engine falls back to the pure-torch kernels (it says so once at run time).
"""
import glob
import os
import platform
import sys

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext


# name -> ISA flags, lowest first; native.py's VARIANTS holds the matching CPU features (keep the two in step).
_AVX2 = ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mlzcnt", "-mpopcnt"]  # Haswell / Zen
_AVX512 = _AVX2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512cd"]  # Skylake-X / Zen 4
VARIANTS = {
    "avx2": _AVX2,
    "avx2_vnni": _AVX2 + ["-mavxvnni"],  # AVX2-only Intel clients since Alder Lake: int8 dot products (vpdpbusd)
    "avx512": _AVX512,
    "avx512_vnni": _AVX512 + ["-mavx512vnni", "-mavx512bf16"],  # Cooper Lake / Sapphire Rapids / Zen 4
}
COMMON_FLAGS = ["-O3", "-fno-math-errno", "-mtune=generic"]
if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
    VARIANTS = {"generic": []}  # other architectures: the kernels' portable paths, one module


class OptionalBuildExt(build_ext):
    """Build each C++ extension variant when a compiler is present; a variant that fails warns and is left out."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any build failure means "no extension"
            print(f"WARNING: fastgpt2 C++ extension not built ({exc}); using the torch sampler.", file=sys.stderr)

    def build_extension(self, ext):
        # The variants compile the same sources: each gets its own object directory.
        build_temp = self.build_temp
        self.build_temp = os.path.join(build_temp, ext.name.rpartition(".")[2])
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            print(f"WARNING: fastgpt2 C++ extension {ext.name} not built ({exc}); CPUs it would serve use the next "
                  "lower variant or the torch kernels.", file=sys.stderr)
        finally:
            self.build_temp = build_temp


def extensions():
    try:
        from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
    except ImportError:
        return []
    sources = sorted(glob.glob("csrc/*.cpp"))
    if not sources:
        return []
    # The sources of one variant compile in parallel (all cores unless FASTGPT2_BUILD_JOBS says otherwise).
    ParallelCompile("FASTGPT2_BUILD_JOBS").install()
    return [
        Pybind11Extension(
            f"fastgpt2._C_{name}",
            sources,
            include_dirs=["csrc"],
            cxx_std=17,
            # bindings.cpp: PYBIND11_MODULE(FASTGPT2_MODULE_NAME, ...) and the module's ISA string.
            define_macros=[("FASTGPT2_MODULE_NAME", f"_C_{name}"), ("FASTGPT2_ISA_NAME", name)],
            extra_compile_args=COMMON_FLAGS + flags,
        )
        for name, flags in VARIANTS.items()
    ]


setup(
    name="fastgpt2",
    version="0.1.0",
    description="A fast GPT-2 engine: paged KV cache, continuous batching, Triton kernels, C++ sampling.",
    python_requires=">=3.10",
    packages=find_packages(include=["fastgpt2", "fastgpt2.*"]),
    package_data={"fastgpt2.model": ["data/*.tiktoken"]},
    include_package_data=True,
    ext_modules=extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
    install_requires=[
        # Capped at 2.13.0 so that a fresh CPU-only venv takes the local CPU wheel, never a multi-GB CUDA build.
        "torch>=2.4,<=2.13.0",
        "triton>=3.2; platform_system == 'Linux'",
        "numpy",
        "tiktoken>=0.6",
        "safetensors>=0.4",
        "huggingface_hub>=0.23",
        "tqdm",
    ],
    extras_require={
        # lm-eval's own `hf` backend (transformers + accelerate) is the reference of tests/test_lm_eval.py.
        "test": ["pytest>=7", "transformers>=4.40", "hypothesis>=6", "lm_eval>=0.4.2", "accelerate>=0.26",
                 "matplotlib"],  # matplotlib: the fine-tuning test checks loss.png
        "bench": ["matplotlib", "pytest-benchmark", "transformers>=4.40"],
        "train": ["matplotlib"],  # loss.png; fine-tuning itself needs nothing beyond torch
        "eval": ["lm_eval>=0.4.2"],
        # `fastgpt2 bench --peers` (with .[bench]): CTranslate2 beside fastgpt2; llama.cpp is found as a binary
        "peers": ["ctranslate2>=4"],
    },
    entry_points={
        "console_scripts": ["fastgpt2=fastgpt2.cli:main"],
        # lm-eval releases from 2026/09 on find `--model fastgpt2` here; older ones through `fastgpt2 lm-eval`.
        "lm_eval.models": ["fastgpt2=fastgpt2.eval.lm_eval_backend:FastGPT2LM"],
    },
)
