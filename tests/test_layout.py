"""The package's layering: model/ usable without the serving engine or the compiled extension, dependencies pointing
one way (cli -> engine, eval, train -> model -> kernels; engine -> kernels), no import cycles, a torch-free scheduler
and block manager, one dispatch module, and no Python file over 400 lines."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fastgpt2"
# layer -> packages it must never import (module level or inside functions)
FORBIDDEN = {
    "kernels": ("fastgpt2.model", "fastgpt2.engine", "fastgpt2.eval", "fastgpt2.train", "fastgpt2.cli"),
    "model": ("fastgpt2.engine", "fastgpt2.eval", "fastgpt2.train", "fastgpt2.cli", "fastgpt2._C"),
    "engine": ("fastgpt2.eval", "fastgpt2.train", "fastgpt2.cli", "fastgpt2._C"),
    "eval": ("fastgpt2.cli", "fastgpt2.train"),
    "train": ("fastgpt2.cli", "fastgpt2.eval", "fastgpt2.engine"),
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Every fastgpt2 module `name` imports, wherever the import statement sits."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m.startswith("fastgpt2")}


def test_import_model_loads_neither_engine_nor_extension():
    code = ("import sys, fastgpt2.model; from fastgpt2.model import GPT2, GPT2Config, Tokenizer; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('fastgpt2'))))")
    loaded = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    assert "fastgpt2.model.gpt2" in loaded
    bad = [m for m in loaded if m.startswith(("fastgpt2.engine", "fastgpt2.train", "fastgpt2.cli", "fastgpt2._C",
                                               "fastgpt2.kernels.native", "fastgpt2.kernels.cpu_sampling"))]
    assert not bad, f"import fastgpt2.model pulled in {bad}"


def test_public_api_is_unchanged():
    code = "from fastgpt2 import LLM, SamplingParams, GPT2, GPT2Config, Tokenizer, RequestOutput, CompletionOutput"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_dependencies_point_one_way(layer):
    modules = _modules()
    for name, path in modules.items():
        if name.startswith(f"fastgpt2.{layer}"):
            bad = [m for m in _imports(name, path) if m.startswith(FORBIDDEN[layer])]
            assert not bad, f"{name} imports {bad}"


def test_no_import_cycles():
    modules = _modules()
    graph = {name: {m if m in modules else m.rpartition(".")[0] for m in _imports(name, path)} & set(modules)
             for name, path in modules.items()}
    # Importing a package runs its __init__; an edge to a package is an edge to that __init__ only.
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in graph[node]:
            if nxt == node or node.startswith(nxt + "."):
                continue  # a package's __init__ has run before any of its submodules: no edge back to it
            if state.get(nxt) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(stack + [nxt])}")
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("module", ["sequence", "block_manager", "scheduler"])
def test_scheduling_is_plain_python(module):
    imported = {a.name.split(".")[0] for node in ast.walk(ast.parse((PACKAGE / "engine" / f"{module}.py").read_text()))
                if isinstance(node, (ast.Import, ast.ImportFrom)) for a in getattr(node, "names", [])}
    tops = {node.module.split(".")[0] for node in ast.walk(ast.parse((PACKAGE / "engine" / f"{module}.py").read_text()))
            if isinstance(node, ast.ImportFrom) and node.module}
    assert "torch" not in imported | tops and "numpy" not in imported | tops


def test_one_dispatch_module():
    """Only kernels/dispatch.py chooses between Triton, C++ and the reference: nobody else imports the C++ wrappers
    or a Triton kernel module to call it directly (tests and benchmarks aside)."""
    direct = ("fastgpt2.kernels.native", "fastgpt2.kernels.cpu_sampling", "fastgpt2.kernels.sampling",
              "fastgpt2.kernels.paged_attention", "fastgpt2.kernels.prefill_attention")
    allowed = {"fastgpt2.engine.cpu_step"}  # the C++ step is a whole model step, not one operation
    for name, path in _modules().items():
        if name in allowed or name.startswith(("fastgpt2.benchmarks", "fastgpt2.kernels")):
            continue
        bad = [m for m in _imports(name, path) if m.startswith(direct)]
        assert not bad, f"{name} picks a kernel itself ({bad}); go through fastgpt2.kernels.dispatch"


def test_no_python_file_over_400_lines():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"split these by role: {long}"
