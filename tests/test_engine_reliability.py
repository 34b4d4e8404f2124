"""The engine under failure and bad input: a step that raises leaves it as good as new, streams never lose text,
per-request values are checked when the request is added, padding ids are never drawn, prefix-cache keys do not
collide."""
import numpy as np
import pytest
import torch

from fastgpt2 import GPT2, LLM, SamplingParams
from fastgpt2.engine import block_manager
from fastgpt2.model.config import GPT2Config
from tests.conftest import TINY_CONFIGS, make_hf_model

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [[5, 6, 7], list(range(300, 340)), [9000]]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("reliability-tiny")
    make_hf_model(TINY_CONFIGS["tiny"], seed=4).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def fresh_tokens(tiny_dir):
    """What a fresh engine gives for PROMPTS, greedy and seeded-sampled."""
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=5, max_tokens=12, ignore_eos=True)
    outs = LLM(str(tiny_dir), device="cpu").generate(PROMPTS * 2, [GREEDY] * 3 + [seeded] * 3, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], seeded


def _assert_clean_and_fresh(llm, fresh_tokens):
    engine = llm.engine
    assert not engine.has_unfinished() and not engine.requests
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    want, seeded = fresh_tokens
    outs = llm.generate(PROMPTS * 2, [GREEDY] * 3 + [seeded] * 3, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want


class Boom(Exception):
    pass


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
@pytest.mark.parametrize("native_decode", ["1", "0"])
def test_step_that_raises_leaves_engine_as_new(tiny_dir, fresh_tokens, error, native_decode, monkeypatch):
    """An exception inside step() (here from a logits processor at the 4th token, mid-batch) aborts the requests of
    that step and frees their blocks; the engine then gives a fresh engine's tokens (C++ and torch decode paths)."""
    monkeypatch.setenv("FASTGPT2_NATIVE_DECODE", native_decode)
    llm = LLM(str(tiny_dir), device="cpu", seed=0)

    def explode_at_4(generated_ids, logits):
        if len(generated_ids) == 3:
            raise error("processor failed")
        return logits

    engine = llm.engine
    engine.add_request(PROMPTS[0], GREEDY)
    engine.add_request(PROMPTS[1], SamplingParams(temperature=0.7, max_tokens=12, logits_processors=[explode_at_4]))
    engine.add_request(PROMPTS[2], SamplingParams(temperature=1.0, max_tokens=12))
    with pytest.raises(error):
        while engine.has_unfinished():
            engine.step()
    _assert_clean_and_fresh(llm, fresh_tokens)


def test_stream_closed_early_frees_its_request(tiny_dir, fresh_tokens):
    llm = LLM(str(tiny_dir), device="cpu")
    pieces = llm.stream("Once upon a time", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    next(pieces), next(pieces)
    pieces.close()
    _assert_clean_and_fresh(llm, fresh_tokens)


@pytest.mark.parametrize("stop", [[], ["\x00\x01"]], ids=["no-stop", "held-back"])
def test_interleaved_streams_and_generate_never_lose_text(tiny_dir, stop):
    """Two streams advanced alternately, and a generate() call between two next() calls: the request of one caller
    finishes inside another's step, and its stream must still yield the rest (text held back for stop strings too)."""
    llm = LLM(str(tiny_dir), device="cpu")
    short = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, stop=stop)
    long = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    want_short = llm.generate(" alpha", short, use_tqdm=False)[0].outputs[0].text
    want_long = llm.generate(" beta", long, use_tqdm=False)[0].outputs[0].text
    a, b = llm.stream(" alpha", short), llm.stream(" beta", long)
    got_a = [next(a)]
    assert len(llm.engine.requests) == 1, "a must still be running when b starts"
    got_b = [next(b) for _ in range(12)]  # b's steps run a to its end
    assert len(llm.engine.requests) == 1 and "".join(got_a) != want_short, "a finished inside b's steps"
    got_a += list(a)
    got_b += list(b)
    assert "".join(got_a) == want_short and "".join(got_b) == want_long
    c = llm.stream(" alpha", short)
    got_c = [next(c)]
    llm.generate(" gamma", long, use_tqdm=False)  # runs c's request to its end as well
    got_c += list(c)
    assert "".join(got_c) == want_short
    assert not llm.engine.requests and not llm.engine.has_unfinished()


def test_min_tokens_holds_off_stop_strings(tiny_dir):
    llm = LLM(str(tiny_dir), device="cpu")
    text = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    first_piece = llm.tokenizer.decode(text.token_ids[:1])
    assert first_piece.strip(), "the test needs a visible first token"
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=12, min_tokens=5, stop=[first_piece],
                                               ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= 5  # not stopped after the first token
    assert out.token_ids == text.token_ids[:len(out.token_ids)]


def test_duplicate_request_id_is_refused(tiny_dir):
    llm = LLM(str(tiny_dir), device="cpu")
    llm.engine.add_request([1, 2], GREEDY, request_id="r1")
    with pytest.raises(ValueError, match="request_id 'r1' is already in use"):
        llm.engine.add_request([3, 4], GREEDY, request_id="r1")
    finished = []
    while llm.engine.has_unfinished():
        finished += llm.engine.step()
    assert [o.prompt_token_ids for o in finished] == [[1, 2]]


@pytest.mark.parametrize("params,message", [
    (SamplingParams(logprobs=21), "logprobs must be at most 20"),
    (SamplingParams(logprobs=10**9), "logprobs must be at most 20"),
    (SamplingParams(logit_bias={50257: 1.0}), "logit_bias names token id 50257, out of range"),
    (SamplingParams(stop_token_ids=[60000]), "stop_token_ids names token id 60000, out of range"),
])
def test_bad_request_fails_alone_and_before_queueing(tiny_dir, params, message):
    llm = LLM(str(tiny_dir), device="cpu")
    with pytest.raises(ValueError, match=message):
        llm.generate([[1, 2], [3, 4]], [GREEDY, params], use_tqdm=False)
    with pytest.raises(ValueError, match=message):
        llm.engine.add_request([3, 4], params)
    assert not llm.engine.has_unfinished() and not llm.engine.requests
    assert llm.generate([1, 2], GREEDY, use_tqdm=False)[0].finished


@pytest.mark.parametrize("bias", [float("inf"), float("-inf"), float("nan")])
def test_logit_bias_must_be_finite(bias):
    with pytest.raises(ValueError, match="^logit_bias value must be a finite number"):
        SamplingParams(logit_bias={5: bias})


def test_tiny_temperature_is_greedy(tiny_dir):
    llm = LLM(str(tiny_dir), device="cpu")
    greedy = llm.generate([1, 2, 3], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    for t in (1e-30, 1e-8, 9e-6):
        p = SamplingParams(temperature=t, top_p=0.5, max_tokens=12, ignore_eos=True)
        assert p.greedy
        assert llm.generate([1, 2, 3], p, use_tqdm=False)[0].outputs[0].token_ids == greedy


def test_array_and_tensor_prompts_equal_lists(tiny_dir):
    llm = LLM(str(tiny_dir), device="cpu")
    want = [o.outputs[0].token_ids for o in llm.generate([[5, 6, 7], [8, 9]], GREEDY, use_tqdm=False)]
    assert llm.generate(np.array([5, 6, 7]), GREEDY, use_tqdm=False)[0].outputs[0].token_ids == want[0]
    assert llm.generate(torch.tensor([5, 6, 7]), GREEDY, use_tqdm=False)[0].outputs[0].token_ids == want[0]
    assert llm.generate([np.array([5, 6, 7]), torch.tensor([8, 9])], GREEDY, use_tqdm=False)[1].outputs[0].token_ids \
        == want[1]
    assert [o.outputs[0].token_ids for o in llm.generate(torch.tensor([[5, 6, 7], [8, 9, 10]])[:, :3], GREEDY,
                                                          use_tqdm=False)][0] == want[0]
    assert llm.generate([np.int64(5), np.int32(6), 7], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == want[0]
    with pytest.raises(ValueError, match="token id 50300 is out of range"):
        llm.generate(np.array([5, 50300]), GREEDY, use_tqdm=False)
    with pytest.raises(TypeError, match="1-D sequence of int token ids"):
        llm.generate([np.array([[5, 6]])], GREEDY, use_tqdm=False)
    with pytest.raises(TypeError, match="1-D sequence of int token ids"):
        llm.generate([[5.0, 6.0]], GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished()


def test_padded_vocabulary_never_draws_padding(tiny_dir):
    """A checkpoint padded past the tokenizer (nanoGPT: 50257 -> 50304) whose padding rows would win every argmax."""
    base = LLM(str(tiny_dir), device="cpu")
    want = base.generate([1, 2, 3], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    config = TINY_CONFIGS["tiny"]
    padded = GPT2(GPT2Config(vocab_size=50304, n_positions=config.n_positions, n_embd=config.n_embd,
                             n_layer=config.n_layer, n_head=config.n_head))
    state = base.model.state_dict()
    wte = state["wte.weight"]
    state["wte.weight"] = torch.cat([wte, 5.0 * wte[want[0]].expand(50304 - 50257, -1)])  # 5x the top logit
    padded.load_state_dict(state)
    with torch.no_grad():
        assert int(padded(torch.tensor([[1, 2, 3]])).logits[0, -1].argmax()) >= 50257, "padding must win unmasked"
    llm = LLM(padded, tokenizer=base.tokenizer)
    outs = llm.generate([[1, 2, 3]] * 2, [GREEDY, SamplingParams(temperature=2.0, max_tokens=30, seed=1,
                                                                   logprobs=3, ignore_eos=True)], use_tqdm=False)
    assert outs[0].outputs[0].token_ids[1:] == want[1:] and outs[0].outputs[0].token_ids[0] == want[0]
    assert max(outs[1].outputs[0].token_ids) < 50257
    # Greedy alone: the C++ step picks the tokens in its LM head's epilogue, over the tokenizer's ids only.
    assert llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == want
    assert all(max(lp) < 50257 for lp in outs[1].outputs[0].logprobs)


@pytest.mark.parametrize("vocab_size", [40000, 50500])
def test_model_tokenizer_mismatch_is_refused(vocab_size):
    config = GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=64, n_layer=1, n_head=1)
    with pytest.raises(ValueError, match=f"vocabulary has {vocab_size} tokens but its tokenizer has 50257"):
        LLM(config, device="cpu")


def test_model_instance_refuses_other_device_or_dtype(tiny_dir):
    model = GPT2.from_pretrained(str(tiny_dir))
    with pytest.raises(ValueError, match="dtype='float16' does not match the given GPT2 module"):
        LLM(model, dtype="float16")
    with pytest.raises(ValueError, match="device='meta' does not match the given GPT2 module"):
        LLM(model, device="meta")
    assert LLM(model, device="cpu", dtype=torch.float32).generate([1, 2], GREEDY, use_tqdm=False)[0].finished


def test_prefix_cache_keys_do_not_depend_on_python_hash(monkeypatch):
    """Two prompts that differ in their first block and agree in the second: a key that collides for them (as
    Python's hash() may: hash(-1) == hash(-2), ints hash modulo 2**61 - 1) must not serve one's KV to the other.
    Here hash() is made to ignore the parent outright; SHA-256 chain keys do not use it."""
    monkeypatch.setattr(block_manager, "hash", lambda key: hash(key[1]), raising=False)
    from fastgpt2.engine.sequence import Sequence

    bm = block_manager.BlockManager(num_blocks=8, block_size=2)
    first = Sequence("a", [1, 2, 7, 8, 9], SamplingParams())
    bm.allocate(first, first.num_tokens)
    first.num_computed_tokens = first.num_tokens
    bm.commit(first)
    other = Sequence("b", [3, 4, 7, 8, 9], SamplingParams())
    assert bm.find_cached_prefix(other) == ([], [])
    again = Sequence("c", [1, 2, 7, 8, 9], SamplingParams())
    blocks, keys = bm.find_cached_prefix(again)
    assert blocks == first.block_table[:2] and all(len(k) == 32 for k in keys)  # SHA-256 digests


def test_extreme_but_valid_values_never_reach_torch(tiny_dir):
    """Values SamplingParams accepts that once overflowed inside torch: top_k past int64, top_p below float32's
    range (keeps the top token), a tiny repetition penalty (+inf logits), the largest seed (seed + index wraps)."""
    llm = LLM(str(tiny_dir), device="cpu")
    greedy = llm.generate([1, 2, 3], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    top1 = SamplingParams(temperature=1.0, top_p=1e-300, top_k=2**70, seed=2**64 - 1, n=2, max_tokens=12,
                          ignore_eos=True)
    outs = llm.generate([1, 2, 3], top1, use_tqdm=False)[0].outputs
    assert [o.token_ids for o in outs] == [greedy, greedy]
    out = llm.generate([1, 2, 3], SamplingParams(temperature=1.0, repetition_penalty=1e-300, seed=1, max_tokens=5),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 5 and max(out.token_ids) < 50257
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64 - 1\]"):
        SamplingParams(seed=2**64)
    with pytest.raises(ValueError, match="^temperature must be a number >= 0"):
        SamplingParams(temperature=float("nan"))


def test_stream_checks_its_request_when_called(tiny_dir):
    llm = LLM(str(tiny_dir), device="cpu")
    with pytest.raises(ValueError, match="prompt has 300 tokens"):
        llm.stream(list(range(300)), GREEDY)
    with pytest.raises(ValueError, match="logprobs must be at most 20"):
        llm.stream("Hi", SamplingParams(logprobs=50))
    assert not llm.engine.has_unfinished()
