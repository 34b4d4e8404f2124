"""The CPU benchmark suite's sampling case and its target report (fastgpt2.benchmarks): the case runs and records the
fast top-p path's rows, and the report says PASS or MISS plainly from the figures; the sampled decode case samples in
both systems."""
import pytest

from fastgpt2.benchmarks import cpu_cases, cpu_report
from fastgpt2.kernels import cpu_sampling as cpu_sampler

SAMPLING_TARGET = "C++ top-p <= 50 us/row on one thread and >= 5x the torch reference"


def sampling_status(sampling: dict) -> dict:
    report = {"results": {"sampling": sampling}, "weights": {"dtype": "float32", "floor_ms_per_step": 25.0}}
    (row,) = [t for t in cpu_report.targets(report) if t["target"] == SAMPLING_TARGET]
    return row


def synthetic(us_per_row: float, reference_us: float) -> dict:
    batch = {"us_per_row": {"fastgpt2.cpu_sampler": us_per_row, "fastgpt2.reference": reference_us,
                            "transformers": 5000.0}}
    return {"has_extension": True, "batches": {1: batch, 64: batch}, "fast_path_rows": {"decided": 7, "deferred": 1}}


def test_sampling_target_says_pass_and_miss_plainly():
    assert sampling_status(synthetic(45.0, 7000.0))["status"] == "PASS"
    missed = sampling_status(synthetic(60.0, 7000.0))
    assert missed["status"] == "MISS" and "B=1: 60.0 us/row" in missed["detail"]
    assert sampling_status(synthetic(40.0, 150.0))["status"] == "MISS"  # under 50 us but not 5x the reference
    assert "rows decided by the fast top-p path: 7 of 8" in missed["detail"]
    no_case = {"results": {}, "weights": {"dtype": "float32", "floor_ms_per_step": 25.0}}
    (row,) = [t for t in cpu_report.targets(no_case) if t["target"] == SAMPLING_TARGET]
    assert row["status"] == "not measured"


def test_batch_and_prefill_targets_are_the_cpu_engine_issue_s():
    def system(tok_s):
        return {"tokens_per_s": tok_s}

    def run(ratio):
        return {"systems": {"fastgpt2": system(100.0 * ratio), "transformers": system(100.0)}}

    results = {"batch": {16: run(2.5), 64: run(1.9)}, "prefill": {"prompt_len": 512, **run(1.31)}}
    report = {"results": results, "weights": {"dtype": "float32", "floor_ms_per_step": 25.0}}
    got = {t["target"]: (t["status"], t["detail"]) for t in cpu_report.targets(report)}
    assert got["16 concurrent float32 >= 2x transformers"] == ("PASS", "2.50x")
    assert got["64 concurrent float32 >= 2x transformers"] == ("MISS", "1.90x")
    assert got["prefill of 512 tokens, float32, >= 1.3x transformers"] == ("PASS", "1.31x")
    results["prefill"]["prompt_len"] = 256  # another length: not this target's figure
    got = {t["target"]: t["status"] for t in cpu_report.targets(report)}
    assert got["prefill of 512 tokens, float32, >= 1.3x transformers"] == "not measured"


@pytest.mark.skipif(not cpu_sampler.HAS_EXTENSION, reason="the C++ extension is not in use")
def test_sampling_case_runs_and_counts_fast_path_rows():
    pytest.importorskip("transformers")
    result = cpu_cases.sampling((1,), repeats=1)
    times = result["batches"][1]["us_per_row"]
    assert set(times) == {"fastgpt2.cpu_sampler", "fastgpt2.reference", "transformers"}
    assert all(t > 0 for t in times.values())
    rows = result["fast_path_rows"]
    # 16 timed calls and one untimed call per timing: 2 warm-up rounds + 1 repeat
    assert rows["decided"] + rows["deferred"] == (16 + 1) * 3
    assert sampling_status(result)["status"] in ("PASS", "MISS")


def test_sampled_decode_case_samples_in_both_systems():
    """The 'sampled' case times decoding at temperature 1 with top-p 0.9 (no top-k) in fastgpt2 and transformers
    alike, and its rows reach the report's table."""
    transformers = pytest.importorskip("transformers")
    from fastgpt2 import GPT2Config

    config = GPT2Config(vocab_size=50257, n_positions=64, n_embd=64, n_layer=1, n_head=1)
    s = cpu_cases.build_systems(transformers, config, "float32", with_fp32=False)
    seen = {"fastgpt2": [], "transformers": []}
    llm_generate, hf_generate = s.llm.generate, s.hf.generate

    def spy_llm(prompts, params, **kw):
        seen["fastgpt2"].append((params.temperature, params.top_p, params.top_k))
        return llm_generate(prompts, params, **kw)

    def spy_hf(*args, **kw):
        seen["transformers"].append((kw.get("do_sample"), kw.get("temperature"), kw.get("top_p"), kw.get("top_k")))
        return hf_generate(*args, **kw)

    s.llm.generate, s.hf.generate = spy_llm, spy_hf
    sampled = cpu_cases.decode(s, 2, 2, 4, repeats=1, top_p=0.9)
    assert set(seen["fastgpt2"]) == {(1.0, 0.9, 0)}
    assert set(seen["transformers"]) == {(True, 1.0, 0.9, 0)}
    seen["fastgpt2"].clear(), seen["transformers"].clear()
    greedy = cpu_cases.decode(s, 2, 2, 4, repeats=1)
    assert {t for t, _, _ in seen["fastgpt2"]} == {0.0} and {d for d, *_ in seen["transformers"]} == {False}
    assert sampled["top_p"] == 0.9 and greedy["top_p"] is None
    seen["fastgpt2"].clear(), seen["transformers"].clear()
    settings = cpu_cases.decode(s, 1, 2, 4, repeats=1, top_p=0.9,
                                sampling={"temperature": 0.8, "repetition_penalty": 1.2})
    assert set(seen["fastgpt2"]) == {(0.8, 0.9, 0)} and set(seen["transformers"]) == {(True, 0.8, 0.9, 0)}
    assert settings["sampling"] == {"temperature": 0.8, "repetition_penalty": 1.2}
    # logprobs: fastgpt2 reports them; transformers returns its raw logits, turned into logprobs in the timed call
    seen["fastgpt2"].clear(), seen["transformers"].clear()
    asked = {"fastgpt2": [], "transformers": []}
    spy_llm_settings, spy_hf_settings = s.llm.generate, s.hf.generate

    def spy_llm_logprobs(prompts, params, **kw):
        asked["fastgpt2"].append(params.logprobs)
        return spy_llm_settings(prompts, params, **kw)

    def spy_hf_logprobs(*args, **kw):
        asked["transformers"].append((kw.get("output_logits"), kw.get("return_dict_in_generate"), "logprobs" in kw))
        return spy_hf_settings(*args, **kw)

    s.llm.generate, s.hf.generate = spy_llm_logprobs, spy_hf_logprobs
    logprobs = cpu_cases.decode(s, 2, 2, 4, repeats=1, top_p=0.9, sampling={"logprobs": 5})
    assert set(asked["fastgpt2"]) == {5} and set(asked["transformers"]) == {(True, True, False)}
    assert set(seen["fastgpt2"]) == {(1.0, 0.9, 0)} and set(seen["transformers"]) == {(True, 1.0, 0.9, 0)}
    rows = {r[0] for r in cpu_report._rows({"batch": {2: greedy}, "sampled": {2: sampled},
                                            "sampled_settings": {"1": settings}, "sampled_logprobs": {2: logprobs}})}
    assert rows == {"decode, 2 concurrent (4-token prompts, N=2)",
                    "decode, 2 concurrent, top-p 0.9 sampling (4-token prompts, N=2)",
                    "decode, 1 concurrent, top-p 0.9, temperature 0.8, repetition penalty 1.2 sampling "
                    "(4-token prompts, N=2)",
                    "decode, 2 concurrent, top-p 0.9, logprobs 5 sampling (4-token prompts, N=2)"}
