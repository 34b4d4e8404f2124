"""LLM.load_weights: new weights served at once, on the C++ decode step and on the torch path, with no stale copy
(the C++ step's, the transposed head's) and no stale prefix-cache K/V."""
import pytest
import torch

from fastgpt2 import GPT2, LLM, SamplingParams
from fastgpt2.kernels import native
from tests.conftest import TINY_CONFIGS, make_hf_model

GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
PROMPTS = [list(range(700, 740)), [5, 6, 7]]  # the first fills two full blocks: a prefix-cache entry


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    dirs = []
    for seed in (11, 12):
        d = tmp_path_factory.mktemp(f"reload-{seed}")
        make_hf_model(TINY_CONFIGS["tiny"], seed=seed).save_pretrained(d)
        dirs.append(d)
    return dirs


def _tokens(llm):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("native_decode", ["1", "0"], ids=["cpp-step", "torch"])
@pytest.mark.parametrize("source", ["directory", "module", "state_dict"])
def test_reloaded_weights_are_served(two_checkpoints, native_decode, source, monkeypatch):
    monkeypatch.setenv("FASTGPT2_NATIVE_DECODE", native_decode)
    first, second = two_checkpoints
    want = _tokens(LLM(str(second), device="cpu"))
    llm = LLM(str(first), device="cpu")
    uses_cpp = llm.engine.runner.cpu_step is not None
    assert uses_cpp == (native_decode == "1" and native.HAS_EXTENSION)
    before = _tokens(llm)
    assert before != want and all(len(set(t)) > 10 for t in before + want)
    new = {"directory": str(second), "module": GPT2.from_pretrained(str(second)),
           "state_dict": GPT2.from_pretrained(str(second)).state_dict()}[source]
    hits = llm.engine.block_manager.num_cache_hits
    llm.load_weights(new)
    assert _tokens(llm) == want
    assert llm.engine.block_manager.num_cache_hits == hits  # the old prompt's cached K/V were dropped, not reused
    assert (llm.engine.runner.cpu_step is not None) == uses_cpp
    llm.load_weights(str(first))  # and back
    assert _tokens(llm) == before


def test_bad_weights_change_nothing(two_checkpoints, tmp_path):
    first, _ = two_checkpoints
    llm = LLM(str(first), device="cpu")
    before = _tokens(llm)
    state = GPT2.from_pretrained(str(first)).state_dict()
    wrong_shape = dict(state, **{"h.0.mlp.c_fc.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=r"h.0.mlp.c_fc.weight has shape \(3, 3\)"):
        llm.load_weights(wrong_shape)
    with pytest.raises(ValueError, match="do not match the served model's parameters"):
        llm.load_weights({k: v for k, v in state.items() if k != "ln_f.bias"})
    other = tmp_path / "other"
    config = TINY_CONFIGS["small"]
    make_hf_model(config, seed=1).save_pretrained(other)
    with pytest.raises(ValueError, match="holds a different architecture"):
        llm.load_weights(str(other))
    llm.engine.add_request([1, 2, 3], GREEDY)
    with pytest.raises(ValueError, match="needs an idle engine"):
        llm.load_weights(state)
    while llm.engine.has_unfinished():
        llm.engine.step()
    assert _tokens(llm) == before


@pytest.mark.skipif(not native.HAS_EXTENSION, reason="the C++ decode step is not built")
def test_reload_refreshes_the_cpp_steps_bfloat16_copies(two_checkpoints):
    """With bfloat16 weight matrices the C++ step reads its own bf16 copies, not the model's parameters: they must be
    rebuilt from the new weights (which are rounded to bfloat16 like the old ones)."""
    first, second = two_checkpoints
    want = _tokens(LLM(GPT2.from_pretrained(str(second)).round_weights_to_bfloat16()))
    llm = LLM(GPT2.from_pretrained(str(first)).round_weights_to_bfloat16())
    assert llm.engine.runner.cpu_step.weight_dtype == "bfloat16"
    before = _tokens(llm)
    llm.load_weights(GPT2.from_pretrained(str(second)).state_dict())  # float32 weights: rounded on the way in
    assert llm.model.decode_weight_dtype == torch.bfloat16
    assert _tokens(llm) == want != before
