"""`fastgpt2 bench --peers` (fastgpt2.benchmarks.peers*): the table's figures and skip reasons, the lookup of
llama.cpp, a tiny end-to-end run, and CTranslate2's float32 greedy tokens against transformers' (when installed).
No timing is asserted."""
import json
import random
import shutil

import pytest

from fastgpt2.benchmarks import peers, peers_ct2, peers_llama, peers_report
from fastgpt2.model.config import GPT2Config

NOISY_VALUE = peers_report.NOISY


def synthetic_report() -> dict:
    rows = [peers._row("fastgpt2", "float32", 4.0, key="fastgpt2"),
            peers._row("transformers", "float32", 4.0, key="transformers"),
            peers._row("fastgpt2", "int8", 1.0, key="fastgpt2 int8", skipped="LLM(..., quantization='int8') does "
                                                                               "not exist yet"),
            peers._row("CTranslate2", "float32", 4.0, skipped="ctranslate2 is not installed"),
            peers._row("llama.cpp", "q8_0", 34 / 32),
            peers._row("llama.cpp", "f16", 2.0, skipped="llama-bench not found")]

    def case(ms_fast, ms_hf, batch=1):
        return {"systems": {"fastgpt2": {"ms_per_step": ms_fast, "tokens_per_s": batch * 1e3 / ms_fast},
                            "transformers": {"ms_per_step": ms_hf, "tokens_per_s": batch * 1e3 / ms_hf}}}

    agreement = {"prompts": 2, "prompt_len": 16, "new_tokens": 4, "reference": peers.REFERENCE,
                 "engines": {"fastgpt2": peers.agreement([[1, 2], [3, 4]], [[1, 2], [3, 4]]),
                             "transformers": peers.agreement([[1, 2], [3, 4]], [[1, 2], [3, 4]])}}
    results = {"decode": case(10.0, 20.0), "batch": {16: case(40.0, 80.0, 16), 64: case(100.0, 1e-6, 64)},
               "prefill": {"systems": {"fastgpt2": {"tokens_per_s": 5000.0}, "transformers": {"tokens_per_s": 2500.0}}},
               "agreement": agreement,
               "llama.cpp": {"q8_0": {"ms_per_token": 3.0, "prefill_tokens_per_s": 900.0, "build_commit": "abc1234",
                                      "batch": {16: {"tokens_per_s": 700.0}}}}}
    machine = {"cpu_model": "Test CPU", "usable_cpus": 2, "torch": "t", "transformers": "x", "ctranslate2": "y",
               "fastgpt2": "z", "fastgpt2_git_commit": "0", "date": "2026-01-01", "load_average_1min_at_start": 0.5}
    return {"machine": machine, "threads": 2, "model": "124M", "num_parameters": 124_439_808,
            "sizes": peers.SIZES["quick"], "bandwidth": {"gb_per_s": 10.0, "bytes_copied": 256 << 20},
            "rows": rows, "results": results, "wall_s": 1.0}


def test_rows_floor_and_skip_reasons():
    report = synthetic_report()
    rows = {r["key"]: r for r in peers_report.fill_rows(report)}
    fast = rows["fastgpt2"]
    assert fast["ms_per_token"] == 10.0 and fast["batch_tokens_per_s"][64] == pytest.approx(640.0)
    assert fast["floor_ms"] == pytest.approx(124_439_808 * 4 / 10e9 * 1e3)
    assert fast["prefill_tokens_per_s"] == 5000.0 and fast["agreement"]["fraction"] == 1.0
    q8 = rows["llama.cpp q8_0"]
    assert q8["ms_per_token"] == 3.0 and q8["batch_tokens_per_s"] == {16: 700.0, 64: None}
    assert q8["floor_ms"] == pytest.approx(fast["floor_ms"] * 34 / 32 / 4)
    assert rows["fastgpt2 int8"]["ms_per_token"] is None
    assert rows["transformers"]["batch_tokens_per_s"][64] == peers_report.NOISY  # a clamped step is no figure
    text = peers_report.render(report)
    assert "**Test CPU**" in text and "abc1234" in text
    assert "skipped: LLM(..., quantization='int8') does not exist yet" in text
    assert "skipped: ctranslate2 is not installed" in text and "skipped: llama-bench not found" in text
    assert "100% (4/4)" in text and "not checked" in text  # llama.cpp has no tokens to compare
    assert "fastgpt2 CPU kernels -," in text and "forced" not in text


def test_targets_pass_miss_and_not_measured(tmp_path, capsys):
    report = synthetic_report()
    report["sizes"] = dict(report["sizes"], batch_sizes=[16, 64], prefill_len=512)

    def row(engine, precision, key, floor, ms, b16, b64, prefill, skipped=None):
        return {"engine": engine, "precision": precision, "key": key, "floor_ms": floor, "ms_per_token": ms,
                "batch_tokens_per_s": {16: b16, 64: b64}, "prefill_tokens_per_s": prefill, "skipped": skipped}

    report["rows"] = [
        row("fastgpt2", "float32", "fastgpt2", 20.0, 20.9, 500.0, 800.0, 1300.0),  # 1.045x its floor
        row("transformers", "float32", "transformers", 20.0, 40.0, 250.0, 401.0, 1000.0),
        row("fastgpt2", "bfloat16", "fastgpt2 bfloat16", 10.0, 11.5, None, None, None),  # 1.15x: over 1.1x
        row("fastgpt2", "int8", "fastgpt2 int8", 5.0, 5.5, 600.0, 1200.0, 2000.0),
        row("CTranslate2", "float32", "CTranslate2 float32", 20.0, 30.0, None, None, None),
        row("CTranslate2", "int8", "CTranslate2 int8", 5.0, 14.0, 500.0, 1000.0, 2000.0),
        row("llama.cpp", "f32", "llama.cpp f32", 20.0, 21.0, None, None, None),
        row("llama.cpp", "f16", "llama.cpp f16", 10.0, 12.0, None, None, None),
        row("llama.cpp", "q8_0", "llama.cpp q8_0", 5.3, None, None, None, None, skipped="llama-bench not found")]
    got = {t["target"].split(",")[0] + (" int8" if ", int8," in t["target"] else ""): t
           for t in peers_report.targets(report)}
    assert len(got) == 7 and got["batch-1 float32 decode <= 1.05x its floor"]["status"] == "PASS"
    assert got["batch-1 16-bit weights decode <= 1.1x its floor"]["status"] == "MISS"  # floor missed, f16 beaten
    int8 = got["batch-1 int8 decode <= 1.15x its floor"]
    assert int8["status"] == "not measured" and "llama.cpp q8_0: not measured" in int8["detail"]
    assert got["16 and 64 concurrent float32 >= 2x transformers"]["status"] == "MISS"  # 800 < 2 x 401
    assert got["prefill of 512 tokens"]["status"] == "PASS"  # float32: 1300 = 1.3 x 1000
    assert got["prefill of 512 tokens int8"]["status"] == "PASS"  # 2000 = CTranslate2 int8's 2000
    assert got["16 and 64 concurrent int8 >= 1.2x CTranslate2 int8"]["status"] == "PASS"  # 600 = 1.2 x 500
    # Once written, the JSON has string batch keys; a noisy step (a string) is no figure.
    report["rows"][3]["batch_tokens_per_s"] = {"16": 600.0, "64": NOISY_VALUE}
    path = tmp_path / "peers.json"
    path.write_text(json.dumps(report))
    assert peers_report.main([str(path)]) == 0
    text = capsys.readouterr().out
    assert "Test CPU" in text
    assert "**not measured** 16 and 64 concurrent int8 >= 1.2x CTranslate2 int8" in text
    assert "64 concurrent tok/s vs 1.2x CTranslate2 int8: not measured" in text
    rendered = peers_report.render(dict(report, targets=peers_report.targets(report)))
    assert "Targets on this CPU (Test CPU" in rendered and "- **PASS** batch-1 float32 decode" in rendered


def test_report_names_the_kernel_variant_and_forced_instruction_sets(monkeypatch):
    from fastgpt2.benchmarks import common
    from fastgpt2.kernels import native

    for name in common.ISA_OVERRIDES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CT2_FORCE_CPU_ISA", "AVX2")
    info = common.machine_info()
    assert info["isa_overrides"] == {"CT2_FORCE_CPU_ISA": "AVX2"}
    assert info["cpu_kernels"] == (native.ISA or "none (torch kernels)")
    report = synthetic_report()
    overrides = {"FASTGPT2_CPU_ISA": "avx2", "CT2_FORCE_CPU_ISA": "AVX2"}
    report["machine"].update(cpu_kernels="avx2", isa_overrides=overrides)
    peers_report.fill_rows(report)
    assert ("fastgpt2 CPU kernels avx2 (instruction sets forced: FASTGPT2_CPU_ISA=avx2, CT2_FORCE_CPU_ISA=AVX2)"
            in peers_report.render(report))


def test_agreement_counts_up_to_the_first_difference():
    got = peers.agreement([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 9, 4], [5, 6, 7, 8]])
    assert (got["matched"], got["total"], got["lengths"]) == (6, 8, [4])


def test_llama_cpp_lookup_says_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.delenv("LLAMA_BENCH", raising=False)
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    tools, reason = peers_llama.find()
    assert tools is None and "llama-bench not found" in reason and "README" in reason
    fake = tmp_path / "llama-bench"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    tools, reason = peers_llama.find()
    assert tools is None and "LLAMA_CPP_DIR" in reason
    (tmp_path / "convert_hf_to_gguf.py").write_text("")
    monkeypatch.setenv("LLAMA_CPP_DIR", str(tmp_path))
    tools, reason = peers_llama.find()
    assert reason is None and tools["bench"] == str(fake) and tools["batched_bench"] is None


@pytest.mark.parametrize("hide_ct2", [False, True], ids=["ct2-if-installed", "ct2-missing"])
def test_tiny_run_end_to_end(monkeypatch, tmp_path, hide_ct2):
    transformers = pytest.importorskip("transformers")
    if hide_ct2:
        monkeypatch.setattr(peers_ct2, "available", lambda: (None, "ctranslate2 is not installed (hidden)"))
    monkeypatch.delenv("LLAMA_BENCH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no llama-bench: its rows say so
    sizes = dict(peers.SIZES["quick"], decode_tokens=8, decode_repeats=3, batch_sizes=(2,), batch_tokens=2,
                 batch_repeats=1, prefill_len=16, prefill_repeats=1, check_prompts=2, check_tokens=4)
    config = GPT2Config(vocab_size=50257, n_positions=64, n_embd=64, n_layer=1, n_head=1)
    paths = {ext: tmp_path / f"peers.{ext}" for ext in ("md", "json", "png")}
    report = peers.run_peers(transformers, config, sizes, threads=2, paths=paths)
    rows = {r["key"]: r for r in report["rows"]}
    assert rows["fastgpt2"]["ms_per_token"] is not None and rows["transformers"]["prefill_tokens_per_s"] is not None
    assert rows["fastgpt2"]["agreement"]["lengths"] == [4]
    assert all("llama-bench not found" in rows[f"llama.cpp {p}"]["skipped"] for p in peers_llama.PRECISIONS)
    ct2_rows = [rows[f"CTranslate2 {p}"] for p in peers_ct2.PRECISIONS]
    if peers_ct2.available()[0] is None:
        assert all("not installed" in r["skipped"] for r in ct2_rows)
    else:
        assert all(r["skipped"] is None and r["ms_per_token"] is not None for r in ct2_rows)
        assert ct2_rows[0]["agreement"]["lengths"] == [4]
    assert paths["md"].read_text().startswith("# CPU engines side by side")
    assert paths["json"].exists()
    # llama.cpp is absent, so the targets naming it cannot pass; the written report carries every judgement.
    judged = {t["target"]: t["status"] for t in report["targets"]}
    assert len(judged) == 7 and judged[next(t for t in judged if t.startswith("batch-1 float32"))] != "PASS"
    assert "Targets on this CPU" in paths["md"].read_text()
    assert peers_report.plot(report, paths["png"]) in (None, "plot skipped: matplotlib is not installed "
                                                            "(pip install -e '.[bench]')")


def test_ctranslate2_float32_greedy_equals_transformers(hf_checkpoint, tmp_path):
    ctranslate2 = pytest.importorskip("ctranslate2")
    transformers = pytest.importorskip("transformers")
    from fastgpt2.model.tokenizer import Tokenizer

    hf_dir = tmp_path / "hf"
    shutil.copytree(hf_checkpoint("tiny"), hf_dir)
    Tokenizer.from_pretrained().save_pretrained(hf_dir)  # the converter reads the vocabulary from the directory
    model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    rng = random.Random(0)
    prompts = [[rng.randrange(50000) for _ in range(12)] for _ in range(3)]
    reference = peers.hf_greedy(model, prompts, 16)
    assert len({t for row in reference for t in row}) > 3  # context-dependent tokens, not one repeated id
    ct2 = peers_ct2.CT2Model(ctranslate2, str(hf_dir), str(tmp_path), "float32", threads=2)
    assert ct2.greedy(prompts, 16) == reference
