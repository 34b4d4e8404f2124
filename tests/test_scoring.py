"""Teacher forcing and scoring: prompt logprobs and llm.score equal log_softmax of transformers' GPT2LMHeadModel on
the same random weights, through chunked prefill, the prefix cache and preemption; the conditional loss agrees."""
import pytest
import torch
from transformers import GPT2LMHeadModel

from fastgpt2 import LLM, SamplingParams
from tests.conftest import TINY_CONFIGS, make_hf_model

ATOL = 1e-4  # float32 logprobs; the engine's GEMMs are shaped differently from transformers'


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("scoring-tiny")
    make_hf_model(TINY_CONFIGS["tiny"], seed=3).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def hf(tiny_dir):
    return GPT2LMHeadModel.from_pretrained(tiny_dir).eval()


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return LLM(str(tiny_dir), device="cpu", block_size=16)


def _ref_logprobs(hf, ids) -> torch.Tensor:
    """(len(ids), V): row p is the distribution of token p + 1."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)


def _ref_score(hf, context, continuation) -> tuple[float, bool]:
    lp = _ref_logprobs(hf, context + continuation)[len(context) - 1:-1]  # (len(continuation), V)
    target = torch.tensor(continuation)
    total = lp.gather(1, target[:, None]).sum().item()
    return total, bool((lp.argmax(-1) == target).all())


def _check_prompt_logprobs(hf, prompt, got, k):
    assert len(got) == len(prompt) and got[0] is None
    ref = _ref_logprobs(hf, prompt)
    for p in range(1, len(prompt)):
        entry, row = got[p], ref[p - 1]
        top = torch.topk(row, k).indices.tolist() if k else []
        assert set(entry) == {prompt[p], *top}, f"position {p}"
        want = torch.tensor([row[t].item() for t in entry])
        torch.testing.assert_close(torch.tensor(list(entry.values())), want, atol=ATOL, rtol=0)


def _ids(n, seed):
    return torch.randint(0, 50256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("k", [0, 5])
def test_prompt_logprobs_match_transformers(llm, hf, k):
    prompts = [_ids(n, seed=n) for n in (1, 2, 17, 33)]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=k)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        _check_prompt_logprobs(hf, prompt, out.prompt_logprobs, k)
        assert out.outputs[0].logprobs is None  # only the prompt's were asked for
    # Asking for them changes nothing else: the same tokens as without.
    plain = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in plain] == [o.outputs[0].token_ids for o in outs]
    assert all(o.prompt_logprobs is None for o in plain)


def test_prompt_logprobs_chunked_prefill_and_prefix_cache(tiny_dir, hf):
    """A 50-token prompt prefilled in chunks of 16; then the same request again. A request with prompt_logprobs
    takes no prefix-cache hit (the cached positions' logits are never recomputed, as in vLLM); a plain one does."""
    llm = LLM(str(tiny_dir), device="cpu", block_size=16, max_num_batched_tokens=16)
    prompt = _ids(50, seed=50)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=5)
    bm = llm.engine.block_manager
    first = llm.generate(prompt, params, use_tqdm=False)[0]
    _check_prompt_logprobs(hf, prompt, first.prompt_logprobs, 5)
    hits = bm.num_cache_hits
    second = llm.generate(prompt, params, use_tqdm=False)[0]
    assert bm.num_cache_hits == hits  # recomputed in full
    _check_prompt_logprobs(hf, prompt, second.prompt_logprobs, 5)
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    llm.generate(prompt, SamplingParams(max_tokens=1), use_tqdm=False)
    assert bm.num_cache_hits - hits == 48  # the first request's blocks were cached for others


def test_prompt_logprobs_one_token_chunks_among_decodes(tiny_dir, hf):
    """15 one-token prompts leave one token of a 16-token budget, so the long prompt is prefilled one token per step
    inside decode-only steps, which then skip the decode fast path (it returns only one row per sequence)."""
    llm = LLM(str(tiny_dir), device="cpu", block_size=16, max_num_batched_tokens=16)
    short = [[t] for t in _ids(15, seed=1)]
    prompt = _ids(40, seed=2)
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    params = [greedy] * 15 + [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, prompt_logprobs=2)]
    outs = llm.generate(short + [prompt], params, use_tqdm=False)
    _check_prompt_logprobs(hf, prompt, outs[-1].prompt_logprobs, 2)
    alone = LLM(str(tiny_dir), device="cpu").generate(short, greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs[:15]] == [o.outputs[0].token_ids for o in alone]


def test_prompt_logprobs_survive_preemption(tiny_dir, hf):
    config = TINY_CONFIGS["tiny"]
    kv_bytes = 10 * 2 * config.n_layer * 16 * config.n_embd * 4  # 10 blocks of 16 tokens for ~6 x 60 tokens
    llm = LLM(str(tiny_dir), device="cpu", block_size=16, kv_cache_memory=kv_bytes, max_num_batched_tokens=24)
    prompts = [_ids(n, seed=100 + n) for n in (30, 41, 25, 37, 44, 29)]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, prompt_logprobs=3)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions >= 2
    for prompt, out in zip(prompts, outs):
        _check_prompt_logprobs(hf, prompt, out.prompt_logprobs, 3)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_prompt_logprobs_bad_values(llm):
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)
    with pytest.raises(ValueError, match="prompt_logprobs must be at most 20"):
        llm.generate(["fine", "too many"], [SamplingParams(), SamplingParams(prompt_logprobs=21)], use_tqdm=False)
    assert not llm.engine.has_unfinished()  # checked before anything was queued
    assert llm.generate("ok", SamplingParams(prompt_logprobs=20, max_tokens=1), use_tqdm=False)[0].finished


def test_score_matches_transformers(llm, hf):
    tok = llm.tokenizer
    shared = _ids(40, seed=7)  # two full blocks a prefix-cache hit can cover
    pairs = [
        ("The quick brown fox", " jumps over the lazy dog"),
        ("Once upon a time, ", "there was a princess."),  # trailing space moves to the continuation
        ("", "Hello world"),  # conditioned on <|endoftext|>
        (shared, _ids(3, seed=8)),
        (shared, _ids(9, seed=9)),
        (torch.tensor(shared), (1, 2, 3)),
        (_ids(5, seed=10), "abc"),  # mixed: each side encoded on its own
        (shared[:20], [shared[20]]),
    ]
    ref_ids = [
        (tok.encode("The quick brown fox"), tok.encode(" jumps over the lazy dog")),
        (tok.encode("Once upon a time,"), tok.encode(" there was a princess.")),
        ([tok.eos_token_id], tok.encode("Hello world")),
        (shared, _ids(3, seed=8)),
        (shared, _ids(9, seed=9)),
        (shared, [1, 2, 3]),
        (_ids(5, seed=10), tok.encode("abc")),
        (shared[:20], [shared[20]]),
    ]
    hits = llm.engine.block_manager.num_cache_hits
    got = llm.score(pairs, use_tqdm=False)
    assert len(got) == len(pairs)
    for (logprob, is_greedy), (context, continuation) in zip(got, ref_ids):
        want, want_greedy = _ref_score(hf, context, continuation)
        assert isinstance(logprob, float) and isinstance(is_greedy, bool)
        assert logprob == pytest.approx(want, abs=ATOL) and is_greedy == want_greedy
    assert all(s.logprob < 0 for s in got)
    # The three pairs on `shared` after the first reuse its two full blocks; the one on shared[:20] its first.
    assert llm.engine.block_manager.num_cache_hits - hits == 2 * 32 + 16
    # Scoring the same pairs again gives the same numbers up to rounding (prefix-cache hits everywhere now).
    again = llm.score(pairs, use_tqdm=False)
    for a, b in zip(again, got):
        assert a.logprob == pytest.approx(b.logprob, abs=ATOL) and a.is_greedy == b.is_greedy


def test_score_is_greedy_both_ways(llm, hf):
    context = _ids(21, seed=11)
    greedy = llm.generate(context, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0].token_ids
    ref = _ref_logprobs(hf, context + greedy)
    second_best = torch.topk(ref[len(context) + 4], 2).indices[1].item()
    not_greedy = greedy[:5] + [second_best]
    (lp_greedy, yes), (lp_not, no) = llm.score([(context, greedy), (context, not_greedy)], use_tqdm=False)
    assert yes is True and no is False
    assert lp_greedy == pytest.approx(_ref_score(hf, context, greedy)[0], abs=ATOL)
    assert lp_not == pytest.approx(_ref_score(hf, context, not_greedy)[0], abs=ATOL)
    assert lp_not < lp_greedy


def test_score_truncates_long_context_from_the_left(llm, hf):
    n_ctx = llm.config.n_positions  # 256
    context, continuation = _ids(300, seed=12), _ids(6, seed=13)
    [(logprob, is_greedy)] = llm.score([(context, continuation)], use_tqdm=False)
    kept = context[-(n_ctx - 1 - len(continuation)):]  # the engine's prompt limit is n_positions - 1 tokens
    want, want_greedy = _ref_score(hf, kept, continuation)
    assert logprob == pytest.approx(want, abs=ATOL) and is_greedy == want_greedy


@pytest.mark.parametrize("pairs,match", [
    ("context", "list of"),
    ([("only one",)], "pair 0 must be"),
    ([("a", "b"), ("context", "")], "pair 1 has an empty continuation"),
    ([([1, 2], [])], "empty continuation"),
    ([([1, 50257], [3])], "token id 50257"),
    ([([1], 2.5)], "continuation must be a str"),
    ([([1], list(range(255)))], "continuation has 255 tokens"),
])
def test_score_bad_input(llm, pairs, match):
    with pytest.raises(ValueError, match=match):
        llm.score(pairs, use_tqdm=False)
    assert not llm.engine.has_unfinished()


def test_conditional_loss_is_the_mean_continuation_nll(llm):
    """README: model(input_ids, labels=labels) with the context positions set to -100 is the mean negative logprob
    of the continuation tokens, the loss of conditional fine-tuning."""
    context, continuation = _ids(12, seed=14), _ids(7, seed=15)
    input_ids = torch.tensor([context + continuation])
    labels = input_ids.clone()
    labels[:, :len(context)] = -100
    with torch.no_grad():
        loss = llm.model(input_ids, labels=labels).loss
    [(logprob, _)] = llm.score([(context, continuation)], use_tqdm=False)
    assert loss.item() == pytest.approx(-logprob / len(continuation), abs=ATOL)
