"""The suite must not pass merely because the C++ extension failed to build and every test fell back to torch: where a
compiler is present, every CPU kernel variant this CPU can run must have been built, and the best one is in use."""
import os
import shutil

import pytest

from fastgpt2.kernels import native


def test_extension_is_built_where_a_compiler_is_present():
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler on this machine: the engine runs on its torch fallbacks by design")
    features = native.cpu_features()
    if features is None:
        pytest.skip("this CPU's features cannot be read: which variants it runs is decided by probing")
    runnable = [v for v in native.VARIANTS if not native.missing_features(v)]
    missing = [v for v in runnable if v not in native.built_variants()]
    assert not missing, (f"{compiler} is present but the CPU kernel variants {missing} (fastgpt2._C_<variant>) were "
                         "not built; rebuild with `pip install -e .`")
    if os.environ.get(native.ENV_VAR) is None and runnable:
        assert native.ISA == runnable[-1], f"the best variant this CPU runs is {runnable[-1]}, {native.ISA} is in use"
