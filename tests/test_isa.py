"""CPU kernel variants (setup.py builds fastgpt2._C_avx2, _C_avx2_vnni, _C_avx512, _C_avx512_vnni;
fastgpt2.kernels.native picks one at import): the choice, FASTGPT2_CPU_ISA and its clear errors, and each variant this
CPU runs giving correct results.

The variants register the same C++ types with pybind11, so one process holds one variant: every variant runs the
tests marked `isa_variants` (C++ decode step against the torch model, sampler against the reference, paged attention)
in a child pytest with FASTGPT2_CPU_ISA=<variant>, without the 124M-geometry decode cases (the tiny model's irregular
widths cover every kernel path and tail). The variant this process uses is left out when this session runs the marked
tests itself."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastgpt2.kernels import native

ROOT = Path(__file__).resolve().parents[1]
ALL_FEATURES = frozenset(f for v in native.VARIANTS.values() for f in v)
X86_VARIANTS = ["avx2", "avx2_vnni", "avx512", "avx512_vnni"]
x86_only = pytest.mark.skipif(list(native.VARIANTS) != X86_VARIANTS, reason="x86 variants only")


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in (native.ENV_VAR, native._HIDE_ENV_VAR)}
    full.update(env, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, cwd=ROOT, timeout=300)


@x86_only
def test_choose_variant_takes_the_best_the_cpu_runs():
    built = X86_VARIANTS
    assert native.choose_variant(None, ALL_FEATURES, built) == "avx512_vnni"
    assert native.choose_variant(None, ALL_FEATURES - {"avx512_bf16"}, built) == "avx512"
    assert native.choose_variant(None, ALL_FEATURES - {"avx512bw"}, built) == "avx2_vnni"  # Alder Lake
    assert native.choose_variant(None, ALL_FEATURES - {"avx512bw", "avx_vnni"}, built) == "avx2"  # Zen 3
    assert native.choose_variant(None, ALL_FEATURES - {"avx_vnni"}, built) == "avx512_vnni"  # Zen 4
    assert native.choose_variant(None, ALL_FEATURES - {"avx512bw"}, ["avx2", "avx512"]) == "avx2"  # not built
    assert native.choose_variant(None, ALL_FEATURES, ["avx2", "avx512"]) == "avx512"  # avx512_vnni not built
    assert native.choose_variant(None, ALL_FEATURES - {"fma"}, built) is None  # no AVX2 + FMA: the torch path
    assert native.choose_variant(None, ALL_FEATURES, []) is None
    assert native.choose_variant("none", ALL_FEATURES, built) is None
    assert native.choose_variant(" AVX2 ", ALL_FEATURES, built) == "avx2"


@x86_only
def test_forced_variant_errors_are_clear():
    with pytest.raises(ValueError, match=r"FASTGPT2_CPU_ISA='avx9000' is not a CPU kernel variant; expected one of "
                                         r"avx2, avx2_vnni, avx512, avx512_vnni, none"):
        native.choose_variant("avx9000", ALL_FEATURES, X86_VARIANTS)
    with pytest.raises(RuntimeError, match="cannot run the avx512_vnni kernels, it lacks avx512_vnni, avx512_bf16"):
        native.choose_variant("avx512_vnni", ALL_FEATURES - {"avx512_vnni", "avx512_bf16"}, X86_VARIANTS)
    with pytest.raises(RuntimeError, match=r"the avx512 kernels \(fastgpt2._C_avx512\) were not built"):
        native.choose_variant("avx512", ALL_FEATURES, ["avx2"])


def test_cpu_features_and_variants():
    features = native.cpu_features()
    assert native.ISA is None or native.ISA in native.available_variants()
    assert set(native.available_variants()) <= set(native.built_variants())
    if features is not None:
        assert native.available_variants() == [v for v in native.built_variants() if not native.missing_features(v)]
    if native.HAS_EXTENSION:
        assert native._C.ISA == native.ISA and native._C.__name__ == f"fastgpt2._C_{native.ISA}"


@x86_only
def test_forcing_an_unknown_or_unrunnable_variant_fails_at_import_with_one_clear_line():
    probe = "import fastgpt2.kernels.native"
    bad = _run(probe, FASTGPT2_CPU_ISA="avx9000")
    assert bad.returncode == 1, bad.stderr  # an exception, not a signal
    assert bad.stderr.strip().splitlines()[-1].startswith("ValueError: FASTGPT2_CPU_ISA='avx9000' is not a CPU kernel")
    # A CPU without VNNI / BF16, simulated by hiding the features from native's view of /proc/cpuinfo.
    old = _run(probe, FASTGPT2_CPU_ISA="avx512_vnni", _FASTGPT2_HIDE_CPU_FEATURES="avx512_vnni,avx512_bf16")
    assert old.returncode == 1, old.stderr
    assert old.stderr.strip().splitlines()[-1] == ("RuntimeError: FASTGPT2_CPU_ISA=avx512_vnni: this CPU cannot run "
                                                   "the avx512_vnni kernels, it lacks avx512_vnni, avx512_bf16")

    # The console command says the same in one line, status 2, before any subcommand runs.
    cli = "import sys; from fastgpt2.cli import main; sys.exit(main(['info']))"
    for env, message in ((dict(FASTGPT2_CPU_ISA="avx9000"), "FASTGPT2_CPU_ISA='avx9000' is not a CPU kernel variant"),
                         (dict(FASTGPT2_CPU_ISA="avx512_vnni", _FASTGPT2_HIDE_CPU_FEATURES="avx512_vnni"),
                          "FASTGPT2_CPU_ISA=avx512_vnni: this CPU cannot run the avx512_vnni kernels, it lacks")):
        said = _run(cli, **env)
        assert said.returncode == 2 and said.stdout == "", said.stderr
        assert len(said.stderr.strip().splitlines()) == 1, said.stderr
        assert said.stderr.startswith(f"fastgpt2: error: {message}"), said.stderr


@x86_only
def test_without_avx2_the_torch_path_runs_and_says_so_once():
    code = ("import warnings, torch; warnings.simplefilter('always')\n"
            "from fastgpt2.kernels import cpu_sampling, native\n"
            "assert native._C is None and native.ISA is None and not cpu_sampling.HAS_EXTENSION\n"
            "q = torch.randn(1, 2, 64); kv = torch.randn(2, 16, 2, 64)\n"
            "native.paged_decode_attention(q, kv, kv, torch.tensor([[0, 1]]), torch.tensor([20]), 0.125)\n"
            "cpu_sampling.topk_topp_minp_sample(torch.randn(2, 50), torch.tensor([5, 0]), torch.tensor([0.9, 1.0]), "
            "torch.zeros(2), torch.rand(2, dtype=torch.float64))\n"
            "print('ok')")
    result = _run(code, _FASTGPT2_HIDE_CPU_FEATURES="avx2,fma")
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    said = [line for line in result.stderr.splitlines() if "RuntimeWarning" in line]
    assert len(said) == 1 and "this CPU cannot run the C++ kernels" in said[0] and "avx2, fma" in said[0], said
    none = _run("from fastgpt2.kernels import native; print(native.ISA, native.HAS_EXTENSION)", FASTGPT2_CPU_ISA="none")
    assert none.stdout.strip() == "None False", none.stderr


def test_a_second_variant_cannot_join_the_first_in_one_process():
    if not native.HAS_EXTENSION or len(native.available_variants()) < 2:
        pytest.skip("needs two runnable variants")
    other = next(v for v in native.available_variants() if v != native.ISA)
    with pytest.raises(RuntimeError, match="one variant per process"):
        native.load_variant(other)


@pytest.mark.parametrize("variant", ["avx2", "avx2_vnni"])
def test_avx2_modules_have_no_avx512_instructions(variant):
    path = getattr(native.importlib.util.find_spec(f"fastgpt2._C_{variant}"), "origin", None)
    if path is None or shutil.which("objdump") is None:
        pytest.skip(f"needs fastgpt2._C_{variant} and objdump")
    disassembly = subprocess.run(["objdump", "-d", path], capture_output=True, text=True, check=True).stdout
    assert "zmm" not in disassembly
    # AVX-VNNI's int8 dot products are the VEX vpdpbusd (objdump marks it {vex}); the EVEX one would need AVX512-VL.
    assert disassembly.count("vpdpbusd") == disassembly.count("{vex} vpdpbusd")
    assert ("vpdpbusd" in disassembly) == (variant == "avx2_vnni")


@pytest.mark.isa_variants
def test_variant_in_use():
    """Run by the child processes below: the forced variant is the one in use, and its ISA probe runs."""
    forced = os.environ.get(native.ENV_VAR)
    if not forced:
        pytest.skip("run under FASTGPT2_CPU_ISA by test_variant_kernels_are_correct")
    assert native.ISA == forced and native._C.ISA == forced
    native._C._isa_probe()


@pytest.mark.parametrize("variant", list(native.VARIANTS))
def test_variant_kernels_are_correct(variant, request):
    if variant not in native.built_variants():
        pytest.skip(f"fastgpt2._C_{variant} is not built (test_build checks that every runnable variant is)")
    if variant not in native.available_variants():
        pytest.skip(f"this CPU cannot run the {variant} kernels")
    if variant == native.ISA and any(item.get_closest_marker("isa_variants") and item.path.name != "test_isa.py"
                                     for item in request.session.items):
        pytest.skip(f"{variant} is in use here: this session runs the marked tests on it")
    files = ["tests/test_isa.py", "tests/test_cpu_step.py", "tests/test_cpu_sampler.py", "tests/test_cpu_attention.py",
             "tests/test_packed_gemm.py", "tests/test_batch_invariance.py", "tests/test_argmax_screen.py"]
    env = {k: v for k, v in os.environ.items() if k != native._HIDE_ENV_VAR}
    env[native.ENV_VAR] = variant
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "isa_variants",
           "-k", "not 124M", *files]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
    assert result.returncode == 0, f"FASTGPT2_CPU_ISA={variant}:\n{tail}"
    assert " passed" in tail and "skipped" not in tail, tail


def test_info_names_the_cpu_and_the_variant(capsys):
    from fastgpt2.cli import info

    info.print_cpu_kernels()
    out = capsys.readouterr().out
    assert f"CPU kernels:  {native.ISA}" in out if native.ISA else "CPU kernels:  none, torch kernels" in out
    assert f"this CPU runs {', '.join(native.available_variants()) or 'none of them'}" in out
