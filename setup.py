"""fastgpt2 packaging: the Python package plus the optional pybind11 CPU sampling extension.

The extension works on raw buffers and does not link against libtorch, so one build serves any torch
version. When it cannot be compiled, installation still succeeds and the engine falls back to the
pure-torch sampler (it says so once at run time).
"""
import glob
import sys

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Build the C++ extension when a compiler is present; otherwise warn and continue."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any build failure means "no extension"
            print(f"WARNING: fastgpt2 C++ extension not built ({exc}); using the torch sampler.", file=sys.stderr)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            print(f"WARNING: fastgpt2 C++ extension not built ({exc}); using the torch sampler.", file=sys.stderr)


def extensions():
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:
        return []
    sources = sorted(glob.glob("csrc/*.cpp"))
    if not sources:
        return []
    return [
        Pybind11Extension(
            "fastgpt2._C",
            sources,
            include_dirs=["csrc"],
            cxx_std=17,
            extra_compile_args=["-O3", "-march=native", "-fno-math-errno"],
        )
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
    },
    entry_points={
        "console_scripts": ["fastgpt2=fastgpt2.cli:main"],
        # lm-eval releases from 2026/09 on find `--model fastgpt2` here; older ones through `fastgpt2 lm-eval`.
        "lm_eval.models": ["fastgpt2=fastgpt2.eval.lm_eval_backend:FastGPT2LM"],
    },
)
