"""The suite must not pass merely because the C++ extension failed to build and every test fell back to torch."""
import importlib
import os
import shutil

import pytest


def test_extension_is_built_where_a_compiler_is_present():
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler on this machine: the engine runs on its torch fallbacks by design")
    try:
        importlib.import_module("fastgpt2._C")
    except ImportError as exc:
        pytest.fail(f"{compiler} is present but fastgpt2._C is not importable ({exc}); rebuild with `pip install -e .`")
