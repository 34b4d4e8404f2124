"""The README's two custom-decoding examples, run as written on a tiny random-weight model."""
import pytest

from fastgpt2 import LLM, SamplingParams
from tests.conftest import TINY_CONFIGS, make_hf_model


def no_repeat_trigram(generated_ids, logits):
    if len(generated_ids) >= 2:
        last = tuple(generated_ids[-2:])
        banned = [c for a, b, c in zip(generated_ids, generated_ids[1:], generated_ids[2:]) if (a, b) == last]
        logits[banned] = float("-inf")
    return logits


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    d = tmp_path_factory.mktemp("custom")
    make_hf_model(TINY_CONFIGS["tiny"], seed=8).save_pretrained(d)
    return LLM(str(d), device="cpu")


def _trigrams(ids):
    return list(zip(ids, ids[1:], ids[2:]))


def test_logits_processor_example(llm):
    greedy = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    plain = llm.generate("Once upon a time", greedy, use_tqdm=False)[0].outputs[0].token_ids
    assert len(set(_trigrams(plain))) < len(_trigrams(plain)), "the test needs a greedy text that repeats a 3-gram"
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True, logits_processors=[no_repeat_trigram])
    ids = llm.generate("Once upon a time", params, use_tqdm=False)[0].outputs[0].token_ids
    assert len(ids) == 100 and len(set(_trigrams(ids))) == len(_trigrams(ids))
    first_repeat = next(i for i, t in enumerate(_trigrams(plain)) if t in _trigrams(plain)[:i])
    assert ids[:first_repeat + 2] == plain[:first_repeat + 2]  # identical until the first repeat would happen


def test_step_loop_example(llm):
    engine = llm.engine
    for seed in range(4):
        engine.add_request("The meaning of life is", SamplingParams(temperature=0.9, seed=seed, max_tokens=30, logprobs=0))
    finished = []
    while engine.has_unfinished():
        finished += engine.step()  # the requests that ended in this step
    best = max(finished, key=lambda o: o.outputs[0].cumulative_logprob / len(o.outputs[0].token_ids))
    assert len(finished) == 4 and len({tuple(o.outputs[0].token_ids) for o in finished}) == 4
    means = [o.outputs[0].cumulative_logprob / len(o.outputs[0].token_ids) for o in finished]
    assert best.outputs[0].cumulative_logprob / len(best.outputs[0].token_ids) == max(means)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
