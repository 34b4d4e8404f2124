"""The engine end to end: greedy tokens equal transformers' generate; the same request gives the same tokens alone,
in a batch, and when preempted; n samples share blocks; stop conditions; bad input."""
import pytest
import torch
from transformers import GPT2LMHeadModel

from fastgpt2 import LLM, SamplingParams
from fastgpt2.kernels import native
from fastgpt2.engine.llm import cpu_has_native_bf16
from tests.conftest import TINY_CONFIGS, make_hf_model
from tests.seeded_draws import assert_same_seeded_samples


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("engine-tiny")
    make_hf_model(TINY_CONFIGS["tiny"], seed=2).save_pretrained(d)
    return d


def _kv_bytes(config, num_blocks, block_size):
    return num_blocks * 2 * config.n_layer * block_size * config.n_embd * 4


def _hf_greedy(hf, prompt, n):
    hf.generation_config.eos_token_id = None  # compare full lengths
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name,block_size", [("tiny", 16), ("small", 32)])
def test_greedy_matches_transformers(name, block_size, tmp_path):
    config = TINY_CONFIGS[name]
    hf = make_hf_model(config, seed=5)
    hf.save_pretrained(tmp_path)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 50256, (n,), generator=g).tolist() for n in (1, 7, 16, 31, 50)]
    llm = LLM(str(tmp_path), device="cpu", block_size=block_size)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        got = out.outputs[0].token_ids
        assert len(got) == 200 and out.outputs[0].finish_reason == "length"
        assert len(set(got)) > 20, "greedy output should be varied, not one token repeated"
        assert got == _hf_greedy(hf, prompt, 200)


@pytest.mark.skipif(cpu_has_native_bf16() and not native.HAS_EXTENSION,
                    reason="this CPU runs bfloat16 natively and the C++ step is not built")
def test_bfloat16_on_cpu_is_bf16_weights_in_float32(tmp_path):
    """On a CPU, with the C++ step or without AVX512-BF16/AMX, dtype='bfloat16' rounds the weights to bfloat16 and
    computes in float32 (the C++ step reads bf16 copies): greedy tokens equal transformers' float32 model with the same
    rounded weights."""
    hf = make_hf_model(TINY_CONFIGS["tiny"], seed=6)
    hf.save_pretrained(tmp_path)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    with pytest.warns(UserWarning, match="bfloat16 weights with float32 arithmetic"):
        llm = LLM(str(tmp_path), device="cpu", dtype="bfloat16")
    assert llm.model.wte.weight.dtype == torch.float32 and llm.model.decode_weight_dtype == torch.bfloat16
    if native.HAS_EXTENSION:
        assert llm.engine.runner.cpu_step.weight_dtype == "bfloat16"
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 50256, (n,), generator=g).tolist() for n in (1, 9, 30)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=120, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        got = out.outputs[0].token_ids
        assert len(set(got)) > 20, "greedy output should be varied, not one token repeated"
        assert got == _hf_greedy(hf, prompt, 120)


def _requests(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50256, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def test_same_output_alone_in_batch_and_preempted(tiny_dir):
    """Greedy tokens are equal exactly (wide margins: rounding cannot flip an argmax). The seeded request is equal
    exactly on the C++ step (batch-invariant); on the torch path its logits are computed in other GEMM shapes when
    batched or recomputed after preemption, so it is compared up to a flip that rounding explains
    (tests/seeded_draws.py)."""
    config = TINY_CONFIGS["tiny"]
    target = list(range(1000, 1013))
    greedy = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    seeded = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=1234, max_tokens=60, ignore_eos=True)
    others = [SamplingParams(temperature=1.0, top_p=0.9, max_tokens=int(m), ignore_eos=True)
              for m in torch.randint(5, 60, (20,), generator=torch.Generator().manual_seed(3))]
    hf = GPT2LMHeadModel.from_pretrained(tiny_dir)

    alone = LLM(str(tiny_dir), device="cpu")
    ref_greedy = alone.generate(target, greedy, use_tqdm=False)[0].outputs[0].token_ids
    ref_seeded = alone.generate(target, seeded, use_tqdm=False)[0].outputs[0].token_ids
    assert ref_greedy != ref_seeded

    # The two target requests come last: the scheduler preempts the newest running sequences first.
    prompts = _requests(10) + _requests(10, 1) + [target, target]
    params = others + [greedy, seeded]
    batched = LLM(str(tiny_dir), device="cpu", seed=7)
    outs = batched.generate(prompts, params, use_tqdm=False)
    assert outs[20].outputs[0].token_ids == ref_greedy
    assert_same_seeded_samples(batched, outs[21].outputs[0].token_ids, ref_seeded, hf, target, seeded)

    # 12 blocks of 16 tokens for 22 requests of up to ~100 tokens: constant preemption, the targets included.
    small = LLM(str(tiny_dir), device="cpu", kv_cache_memory=_kv_bytes(config, 12, 16), seed=9)
    outs = small.generate(prompts, params, use_tqdm=False)
    assert small.engine.scheduler.num_preemptions >= 3
    assert outs[20].metrics["num_preemptions"] >= 1 and outs[21].metrics["num_preemptions"] >= 1
    assert outs[20].outputs[0].token_ids == ref_greedy
    assert_same_seeded_samples(small, outs[21].outputs[0].token_ids, ref_seeded, hf, target, seeded)
    assert all(o.finished for o in outs)
    # Nothing leaked: every block is back in the free list.
    assert small.engine.block_manager.num_free_blocks == small.engine.block_manager.num_blocks


def test_n_samples_share_prompt_blocks(tiny_dir):
    llm = LLM(str(tiny_dir), device="cpu", block_size=16)
    prompt = list(range(2000, 2040))  # 2.5 blocks: a shared partly-filled block is copied on write
    params = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=20, ignore_eos=True)
    out = llm.generate(prompt, params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 4
    # Sample k depends only on (seed, k): a fresh engine, which computes along the same path, gives the same tokens.
    fresh = LLM(str(tiny_dir), device="cpu", block_size=16).generate(prompt, params, use_tqdm=False)[0]
    assert [c.token_ids for c in fresh.outputs] == [c.token_ids for c in out.outputs]
    # The second run here is a prefix-cache hit: it computes the last prompt token alone, not inside the 40-row
    # prefill. The C++ step gives it the same logits bitwise; on the torch path they differ by rounding and a tail
    # draw may flip (seen on Intel AVX-512): compared up to a flip that rounding explains (tests/seeded_draws.py).
    hits_before = llm.engine.block_manager.num_cache_hits
    again = llm.generate(prompt, params, use_tqdm=False)[0]
    assert llm.engine.block_manager.num_cache_hits - hits_before == 32  # the prompt's two full blocks were reused
    hf = GPT2LMHeadModel.from_pretrained(tiny_dir)
    for k, (a, b) in enumerate(zip(again.outputs, out.outputs)):
        assert_same_seeded_samples(llm, a.token_ids, b.token_ids, hf, prompt, params, index=k)


def test_prefix_cache_gives_same_greedy_tokens(tiny_dir):
    llm = LLM(str(tiny_dir), device="cpu", block_size=16)
    shared = list(range(3000, 3050))
    p = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    first = llm.generate(shared + [5], p, use_tqdm=False)[0].outputs[0].token_ids
    hits_before = llm.engine.block_manager.num_cache_hits
    second = llm.generate(shared + [5], p, use_tqdm=False)[0].outputs[0].token_ids
    assert llm.engine.block_manager.num_cache_hits - hits_before == 48
    assert first == second
    fresh = LLM(str(tiny_dir), device="cpu", enable_prefix_caching=False)
    assert fresh.generate(shared + [5], p, use_tqdm=False)[0].outputs[0].token_ids == first


def test_chunked_prefill_matches_unchunked(tiny_dir):
    p = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    prompts = [list(range(100, 200)), list(range(500, 507))]
    whole = LLM(str(tiny_dir), device="cpu").generate(prompts, p, use_tqdm=False)
    chunked = LLM(str(tiny_dir), device="cpu", max_num_batched_tokens=24).generate(prompts, p, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in whole] == [o.outputs[0].token_ids for o in chunked]


def test_stop_conditions_and_text(tiny_dir):
    llm = LLM(str(tiny_dir), device="cpu")
    base = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)[0]
    ids = base.outputs[0].token_ids
    assert base.outputs[0].text == llm.tokenizer.decode(ids)
    # stop token id: ends at its first occurrence, included in token_ids, not in the text
    stop_id = ids[5]
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop_id]),
                       use_tqdm=False)[0].outputs[0]
    first = ids.index(stop_id)
    assert out.token_ids == ids[: first + 1] and out.finish_reason == "stop"
    # stop string: cut before it
    text = base.outputs[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=40, stop=[stop], ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.text == text[: text.index(stop)]
    # max_tokens past the context ends with 'length' at the context
    long_prompt = list(range(1000, 1250))  # the tiny model's context is 256
    out = llm.generate(long_prompt, SamplingParams(temperature=0, max_tokens=100, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 6 and out.finish_reason == "length"


def test_stream_equals_generate(tiny_dir):
    llm = LLM(str(tiny_dir), device="cpu")
    p = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    pieces = list(llm.stream("Once upon a time", p))
    assert len(pieces) > 5
    assert "".join(pieces) == llm.generate("Once upon a time", p, use_tqdm=False)[0].outputs[0].text


def test_empty_prompt_is_unconditional(tiny_dir):
    llm = LLM(str(tiny_dir), device="cpu")
    out = llm.generate("", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)[0]
    assert out.prompt_token_ids == [50256] and len(out.outputs[0].token_ids) == 5


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=6, logprobs=3, ignore_eos=True),
    SamplingParams(n=2, temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.3, presence_penalty=0.5,
                   frequency_penalty=0.4, seed=11, max_tokens=12, logprobs=5, ignore_eos=True),
], ids=["greedy", "sampled-penalised"])
def test_logprobs_match_reference(tiny_dir, params):
    """Logprobs are the model's raw distribution (as in vLLM), whatever temperature, truncation and penalties did to
    the draw: each step's top-N and the sampled token's logprob equal transformers' log_softmax on the same context
    (float32, atol 1e-4), and cumulative_logprob is their sum."""
    llm = LLM(str(tiny_dir), device="cpu")
    prompt = [1, 2, 3, 400, 5000]
    hf = GPT2LMHeadModel.from_pretrained(tiny_dir).eval()
    for out in llm.generate(prompt, params, use_tqdm=False)[0].outputs:
        assert len(out.logprobs) == len(out.token_ids) == params.max_tokens
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([prompt + out.token_ids])).logits[0].double(), dim=-1)
        ref = ref[len(prompt) - 1:-1]  # (num_tokens, V): the distribution each generated token was drawn from
        for step, (token, lp) in enumerate(zip(out.token_ids, out.logprobs)):
            values, ids = torch.topk(ref[step], params.logprobs)
            want = {int(i): float(v) for i, v in zip(ids, values)} | {token: float(ref[step, token])}
            assert sorted(lp) == sorted(want), f"step {step}: top-{params.logprobs} ids differ"
            for i, v in want.items():
                assert lp[i] == pytest.approx(v, abs=1e-4)
        want_sum = float(ref[torch.arange(len(out.token_ids)), out.token_ids].sum())
        assert out.cumulative_logprob == pytest.approx(want_sum, abs=1e-3)
        if not params.greedy:  # the draw followed the processed distribution, not the raw argmax
            assert any(out.token_ids[i] != int(ref[i].argmax()) for i in range(len(out.token_ids)))


def test_logprobs_of_changed_and_unchanged_rows_in_one_batch(tiny_dir):
    """One batch mixing requests whose logits the sampler changes in place before the draw (temperature, penalty,
    logit bias, min_tokens ban) with ones it leaves as they are (temperature 1, greedy): the sampler copies only the
    former and reads the latter in place; every request's logprobs are still transformers' raw log_softmax (float32,
    atol 1e-4)."""
    llm = LLM(str(tiny_dir), device="cpu")
    prompt = [1, 2, 3, 400, 5000]
    common = dict(max_tokens=6, logprobs=4, ignore_eos=True, seed=5)
    params = [SamplingParams(temperature=1.0, top_p=0.9, **common), SamplingParams(temperature=0.7, **common),
              SamplingParams(temperature=0, **common), SamplingParams(repetition_penalty=1.4, **common),
              SamplingParams(logit_bias={7: 3.0}, **common), SamplingParams(min_tokens=3, **common),
              SamplingParams(temperature=1.0, **{**common, "logprobs": 0})]
    outs = llm.generate([prompt] * len(params), params, use_tqdm=False)
    hf = GPT2LMHeadModel.from_pretrained(tiny_dir).eval()
    for p, o in zip(params, outs):
        out = o.outputs[0]
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([prompt + out.token_ids])).logits[0].double(), dim=-1)
        ref = ref[len(prompt) - 1:-1]
        for step, (token, lp) in enumerate(zip(out.token_ids, out.logprobs)):
            values, ids = torch.topk(ref[step], p.logprobs)
            want = {int(i): float(v) for i, v in zip(ids, values)} | {token: float(ref[step, token])}
            assert sorted(lp) == sorted(want), (p, step)
            assert all(lp[i] == pytest.approx(v, abs=1e-4) for i, v in want.items()), (p, step)


@pytest.mark.parametrize("kwargs,field", [
    ({"temperature": -0.1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 40}, "top_p"), ({"top_k": -2}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"), ({"n": 0}, "n"), ({"min_p": 1.5}, "min_p"),
])
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        SamplingParams(**kwargs)


def test_bad_prompts_leave_engine_clean(tiny_dir):
    config = TINY_CONFIGS["tiny"]
    llm = LLM(str(tiny_dir), device="cpu", kv_cache_memory=_kv_bytes(config, 4, 16))
    with pytest.raises(ValueError, match="prompt has 300 tokens but the model's context is 256"):
        llm.generate([[1, 2], list(range(300))], use_tqdm=False)
    with pytest.raises(ValueError, match="token id 50257 is out of range"):
        llm.generate([[1, 50257]], use_tqdm=False)
    with pytest.raises(ValueError, match=r"needs 7 KV blocks \(.*bytes\).*holds only 4 blocks"):
        llm.generate([list(range(100))], SamplingParams(max_tokens=10), use_tqdm=False)
    assert not llm.engine.has_unfinished()
    assert llm.generate([[1, 2]], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0].finished


def test_logits_processor_bias_penalties_and_min_tokens(tiny_dir):
    llm = LLM(str(tiny_dir), device="cpu")
    prompt = [11, 22, 33]

    def force_42(generated_ids, logits):
        out = torch.full_like(logits, float("-inf"))
        out[42] = 0.0
        return out

    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=5, logits_processors=[force_42]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [42] * 5
    out = llm.generate(prompt, SamplingParams(temperature=0.8, seed=1, max_tokens=5, logit_bias={777: 1e4}),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [777] * 5
    # A huge repetition penalty forbids repeating any earlier token, in the greedy text too.
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    plain = llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0].token_ids
    assert len(set(plain)) < len(plain), "the test needs a greedy text that repeats itself"
    penalised = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, repetition_penalty=1e6,
                                                    ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
    assert len(set(penalised + prompt)) == len(penalised + prompt)
    # Presence/frequency penalties (output tokens only) cut repetition too.
    freq = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, frequency_penalty=2.0,
                                               presence_penalty=2.0, ignore_eos=True), use_tqdm=False)
    freq_ids = freq[0].outputs[0].token_ids
    assert freq_ids != plain and len(set(freq_ids)) > len(set(plain))
    # min_tokens bans stop tokens until that many tokens exist.
    stop_id = plain[0]
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, min_tokens=4, stop_token_ids=[stop_id]),
                       use_tqdm=False)[0].outputs[0]
    assert stop_id not in out.token_ids[:4] and len(out.token_ids) >= 5


def test_sampler_torch_work_runs_on_one_thread_and_restores_the_count(tiny_dir):
    """On the CPU the sampler's per-row torch work (processors, penalties, temperature) runs on one torch thread, so
    that OpenMP's threads do not spin on after it into the next step; the thread count is restored after every step,
    and after a processor that raises. The tokens are those of the same requests sampled as before (seeded draws at
    temperature != 1 are compared with the reference in test_batch_invariance.py)."""
    llm = LLM(str(tiny_dir), device="cpu")
    before = torch.get_num_threads()
    if before < 2:
        torch.set_num_threads(2)
    try:
        threads = torch.get_num_threads()
        seen = []

        def spy(generated_ids, logits):
            seen.append(torch.get_num_threads())
            return logits

        params = SamplingParams(temperature=0.7, repetition_penalty=1.3, seed=9, max_tokens=6, ignore_eos=True,
                                logits_processors=[spy])
        out = llm.generate([[11, 22, 33], [5, 6]], params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == 6 for o in out)
        from fastgpt2.engine import torch_threads

        assert seen and set(seen) == ({1} if torch_threads._OPENMP else {threads})  # OpenMP builds only
        assert torch.get_num_threads() == threads

        def boom(generated_ids, logits):
            raise RuntimeError("processor failed")

        with pytest.raises(RuntimeError, match="processor failed"):
            llm.generate([[11, 22, 33]], SamplingParams(temperature=0.7, max_tokens=3, logits_processors=[boom]),
                         use_tqdm=False)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not native.HAS_EXTENSION, reason="C++ extension not built")
def test_plain_greedy_rows_are_picked_in_the_step(tiny_dir, monkeypatch):
    """Greedy requests that read nothing but the argmax get their tokens from the C++ step's LM head epilogue (no
    logits written): the same tokens as the sampler's argmax on the logits; any request that needs the logits (logprobs,
    prompt logprobs, processors, logit bias, a min_tokens ban, penalties, n > 1, sampling) keeps the logits path."""
    from fastgpt2.engine.llm_engine import LLMEngine

    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 50256, (n,), generator=g).tolist() for n in (1, 5, 17, 40)]
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm = LLM(str(tiny_dir), device="cpu")
    runner, fused_steps = llm.engine.runner, []
    original_run = runner.run

    def spy(*args, greedy_limit=None, **kwargs):
        fused_steps.append(greedy_limit is not None)
        return original_run(*args, greedy_limit=greedy_limit, **kwargs)

    monkeypatch.setattr(runner, "run", spy)
    fused = [o.outputs[0].token_ids for o in llm.generate(prompts, plain, use_tqdm=False)]
    assert fused_steps and all(fused_steps)
    assert len({t for ids in fused for t in ids}) > 10  # varied text
    monkeypatch.setattr(LLMEngine, "_plain_greedy", lambda *a: False)
    fused_steps.clear()
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, plain, use_tqdm=False)] == fused
    assert fused_steps and not any(fused_steps)
    monkeypatch.undo()
    monkeypatch.setattr(runner, "run", spy)
    needs_logits = [dict(logprobs=0), dict(prompt_logprobs=1), dict(logits_processors=[lambda ids, row: row]),
                    dict(logit_bias={11: 0.5}), dict(min_tokens=3), dict(repetition_penalty=1.2), dict(n=2),
                    dict(temperature=0.8, seed=1)]
    for extra in needs_logits:
        params = SamplingParams(**{**dict(temperature=0, max_tokens=4, ignore_eos=True), **extra})
        fused_steps.clear()
        llm.generate(prompts[:2], [plain, params], use_tqdm=False)
        assert not any(fused_steps[:1]), extra  # the first step samples both requests: the logits path
    fused_steps.clear()
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, min_tokens=3),
                 use_tqdm=False)
    assert fused_steps[:3] == [False] * 3 and all(fused_steps[3:])  # the EOS ban ends after 3 tokens
