"""Beam search against transformers' generate(num_beams=k): every returned sequence and score equal, with and without
EOS reached, for several prompts batched together; beams share KV blocks; every block freed; bad values refused."""
import math
import subprocess
import sys

import pytest
import torch

from fastgpt2 import LLM
from tests.conftest import TINY_CONFIGS, make_hf_model

EOS = 50256
SCORE_TOL = 1e-4  # float32 logits of different GEMM shapes, summed over up to 24 tokens


def make_eos_model(seed: int = 3, strength: float = 0.9):
    """A wide-margin model whose EOS embedding points along the mean final hidden state, so that its logit is
    strength x the typical top-1 logit: EOS becomes a candidate every few tokens and ends many beams, at many lengths.
    The head is tied to wte, so both models (this one and the engine's, loaded from it) see the same EOS row."""
    hf = make_hf_model(TINY_CONFIGS["tiny"], seed=seed)
    with torch.no_grad():
        x = torch.randint(0, EOS, (4, 64), generator=torch.Generator().manual_seed(9))
        h = hf.transformer(x).last_hidden_state.reshape(-1, hf.config.n_embd)
        mean = h.mean(0)
        top1 = (h @ hf.transformer.wte.weight.T).max(-1).values.mean()
        hf.transformer.wte.weight[EOS] = mean * (strength * top1 / (h @ mean).mean())
    return hf


@pytest.fixture(scope="module")
def eos_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("beam-eos")
    make_eos_model().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def hf(eos_dir):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(eos_dir).eval()


@pytest.fixture(scope="module")
def llm(eos_dir):
    return LLM(str(eos_dir), device="cpu")


def _prompts(lengths=(1, 7, 30), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, EOS, (n,), generator=g).tolist() for n in lengths]


def hf_beams(hf, prompt, k, max_tokens, n, ignore_eos=False, **kwargs):
    """transformers' n best sequences (generated ids, a final EOS kept, padding cut) and sequences_scores."""
    ids = torch.tensor([prompt])
    extra = {"eos_token_id": None} if ignore_eos else {}
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                      num_beams=k, num_return_sequences=n, pad_token_id=EOS, output_scores=True,
                      return_dict_in_generate=True, **extra, **kwargs)
    seqs = []
    for row in out.sequences:
        gen = row[len(prompt):].tolist()
        if not ignore_eos and EOS in gen:
            gen = gen[:gen.index(EOS) + 1]  # the rest is padding (pad_token_id is EOS)
        seqs.append(gen)
    return seqs, out.sequences_scores.tolist()


def assert_same_as_hf(out, hf, prompt, k, max_tokens, n, ignore_eos=False, **kwargs):
    want, want_scores = hf_beams(hf, prompt, k, max_tokens, n, ignore_eos, **kwargs)
    got = [c.token_ids for c in out.outputs]
    assert got == want
    assert [c.index for c in out.outputs] == list(range(n))
    for c, score in zip(out.outputs, want_scores):
        assert abs(c.score - score) <= SCORE_TOL
        penalty = len(c.token_ids) ** kwargs.get("length_penalty", 1.0)
        assert c.score == pytest.approx(c.cumulative_logprob / penalty, rel=1e-5)
        stopped = not ignore_eos and c.token_ids[-1] == EOS
        assert c.finish_reason == ("stop" if stopped else "length")
    return want


@pytest.mark.parametrize("k", [2, 4, 8])
def test_matches_transformers(llm, hf, k):
    """All k sequences in order (num_return_sequences=k) and their scores, for prompts of 1, 7 and 30 tokens run
    together, over length penalties and every early_stopping mode; EOS ends some beams, the length limit others."""
    prompts = _prompts()
    best, seen = [], {}
    for length_penalty in (1.0, 2.0, 0.0):
        for early_stopping in (False, True, "never"):
            outs = llm.beam_search(prompts, beam_width=k, max_tokens=24, length_penalty=length_penalty,
                                   early_stopping=early_stopping, n=k)
            assert len(outs) == len(prompts)
            for prompt, out in zip(prompts, outs):
                assert out.prompt_token_ids == prompt and out.finished
                want = assert_same_as_hf(out, hf, prompt, k, 24, k, length_penalty=length_penalty,
                                         early_stopping=early_stopping)
                best.append(want[0])
                seen.setdefault((length_penalty, len(prompt)), set()).add(tuple(map(tuple, want)))
    # The cases are not degenerate: EOS ends some best sequences and not others, and early_stopping matters.
    assert any(b[-1] == EOS and len(b) < 24 for b in best) and any(len(b) == 24 and b[-1] != EOS for b in best)
    assert any(len(variants) > 1 for variants in seen.values())
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_ignore_eos(llm, hf):
    """Where EOS ends the best beam, ignore_eos goes on to max_tokens, as transformers with eos_token_id=None."""
    prompts = _prompts((7, 30))
    with_eos = llm.beam_search(prompts, beam_width=4, max_tokens=20)
    ended = [out.outputs[0] for out in with_eos if out.outputs[0].finish_reason == "stop"]
    assert ended and all(c.token_ids[-1] == EOS and len(c.token_ids) < 20 for c in ended)
    assert all(c.text == llm.tokenizer.decode(c.token_ids[:-1]) for c in ended)  # EOS is not part of the text
    for prompt, out in zip(prompts, with_eos):
        assert_same_as_hf(out, hf, prompt, 4, 20, 1)
    outs = llm.beam_search(prompts, beam_width=4, max_tokens=20, ignore_eos=True, n=3)
    for prompt, out in zip(prompts, outs):
        assert_same_as_hf(out, hf, prompt, 4, 20, 3, ignore_eos=True)
        assert all(len(c.token_ids) == 20 for c in out.outputs)


def test_beam_width_one_is_greedy_without_eos(llm, hf):
    prompt = _prompts((9,))[0]
    out = llm.beam_search(prompt, beam_width=1, max_tokens=15, ignore_eos=True)[0]
    ids = torch.tensor([prompt])
    greedy = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=15, do_sample=False,
                         eos_token_id=None, pad_token_id=EOS)[0, len(prompt):].tolist()
    assert out.outputs[0].token_ids == greedy


def test_stops_at_the_context(llm, hf):
    n_ctx = TINY_CONFIGS["tiny"].n_positions
    prompt = _prompts((n_ctx - 6,), seed=5)[0]
    out = llm.beam_search(prompt, beam_width=4, max_tokens=50, ignore_eos=True, n=4)[0]
    assert_same_as_hf(out, hf, prompt, 4, 6, 4, ignore_eos=True)
    assert all(len(c.token_ids) == 6 for c in out.outputs)


def test_one_new_token_and_no_prompts(llm, hf):
    prompt = _prompts((5,), seed=7)[0]
    out = llm.beam_search([prompt], beam_width=4, max_tokens=1, n=4)[0]
    assert_same_as_hf(out, hf, prompt, 4, 1, 4)
    assert llm.beam_search([]) == []


def _ids(outs):
    return [[c.token_ids for c in out.outputs] for out in outs]


def _record_batches(monkeypatch, llm):
    """Wrap the runner: per call, the request ids of its rows and the KV blocks in use (after allocation)."""
    runner, bm = llm.engine.runner, llm.engine.block_manager
    calls = []
    real_run = runner.run

    def run(sched, sample_mask, *args, **kwargs):
        calls.append(([s.request_id for s in sched.seqs], bm.num_blocks - bm.num_free_blocks, len(sched.block_copies)))
        return real_run(sched, sample_mask, *args, **kwargs)

    monkeypatch.setattr(runner, "run", run)
    return calls


def test_prompts_share_one_batch_and_limits_hold(monkeypatch, eos_dir, hf):
    """Three prompts' beams decode in the same runner calls; with small limits the prompts prefill in chunks and the
    beams decode in batches of max_num_seqs, and each prompt still gets what transformers gives it alone."""
    prompts = _prompts((30, 7, 12), seed=2)
    llm = LLM(str(eos_dir), device="cpu", block_size=4, max_num_batched_tokens=16, max_num_seqs=5)
    calls = _record_batches(monkeypatch, llm)
    outs = llm.beam_search(prompts, beam_width=4, max_tokens=12, ignore_eos=True, n=2)
    for prompt, out in zip(prompts, outs):
        assert_same_as_hf(out, hf, prompt, 4, 12, 2, ignore_eos=True)
    sizes = [len(ids) for ids, _, _ in calls]
    assert max(sizes) == 5  # 12 beams, split by max_num_seqs
    assert any(len(set(ids)) == 2 for ids, _, _ in calls)
    assert sum(1 for ids, _, _ in calls if ids and len(ids) < 5) >= 1

    plain = LLM(str(eos_dir), device="cpu")
    calls = _record_batches(monkeypatch, plain)
    outs2 = plain.beam_search(prompts, beam_width=4, max_tokens=12, ignore_eos=True, n=2)
    assert _ids(outs2) == _ids(outs)
    decode_sizes = [len(ids) for ids, _, _ in calls[1:]]  # after the one prefill step of all three prompts
    assert len(set(calls[0][0])) == 3 and decode_sizes and all(size == 12 for size in decode_sizes)


def test_beams_share_blocks(monkeypatch, eos_dir):
    """Forked beams share the prompt's blocks and their common history: the peak of blocks in use stays far below
    beam_width full copies, partly filled shared blocks are copied on write, and everything is freed."""
    llm = LLM(str(eos_dir), device="cpu", block_size=4)
    bm = llm.engine.block_manager
    calls = _record_batches(monkeypatch, llm)
    prompt, k, max_tokens = _prompts((30,), seed=3)[0], 8, 40
    out = llm.beam_search(prompt, beam_width=k, max_tokens=max_tokens, ignore_eos=True)[0]
    assert len(out.outputs[0].token_ids) == max_tokens
    peak = max(in_use for _, in_use, _ in calls)
    full_copies = k * bm.blocks_for(len(prompt) + max_tokens)
    assert peak <= full_copies // 3, (peak, full_copies)
    assert sum(copies for _, _, copies in calls) > 0  # copy-on-write of shared partly filled blocks
    assert bm.num_free_blocks == bm.num_blocks and all(r == 0 for r in bm.ref_counts)


def test_errors_free_every_block(monkeypatch, eos_dir):
    llm = LLM(str(eos_dir), device="cpu")
    bm = llm.engine.block_manager
    prompts = _prompts((7, 30))
    ref = llm.beam_search(prompts, beam_width=4, max_tokens=10)
    runner = llm.engine.runner
    real_run, count = runner.run, [0]

    def failing(*args, **kwargs):
        count[0] += 1
        if count[0] == 4:
            raise KeyboardInterrupt
        return real_run(*args, **kwargs)

    monkeypatch.setattr(runner, "run", failing)
    with pytest.raises(KeyboardInterrupt):
        llm.beam_search(prompts, beam_width=4, max_tokens=10)
    assert bm.num_free_blocks == bm.num_blocks and not llm.engine.has_unfinished()
    monkeypatch.setattr(runner, "run", real_run)
    assert _ids(llm.beam_search(prompts, beam_width=4, max_tokens=10)) == _ids(ref)


def test_running_out_of_blocks_names_kv_cache_memory(eos_dir):
    config = TINY_CONFIGS["tiny"]
    block_bytes = 2 * config.n_layer * 16 * config.n_embd * 4
    llm = LLM(str(eos_dir), device="cpu", kv_cache_memory=8 * block_bytes)
    with pytest.raises(RuntimeError, match="kv_cache_memory"):
        llm.beam_search(_prompts((30,))[0], beam_width=8, max_tokens=60, ignore_eos=True)
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert llm.beam_search(_prompts((3,))[0], beam_width=2, max_tokens=5)[0].finished


@pytest.mark.parametrize("kwargs,message", [
    (dict(beam_width=0), "beam_width must be an integer >= 1"),
    (dict(beam_width=2.0), "beam_width must be an integer"),
    (dict(beam_width=2, n=3), "n must be at most beam_width"),
    (dict(n=0), "n must be an integer >= 1"),
    (dict(max_tokens=0), "max_tokens must be an integer >= 1"),
    (dict(length_penalty=math.nan), "length_penalty must be a finite number"),
    (dict(length_penalty=math.inf), "length_penalty must be a finite number"),
    (dict(early_stopping="sometimes"), "early_stopping must be True, False or 'never'"),
    (dict(early_stopping=1), "early_stopping must be True, False or 'never'"),
    (dict(beam_width=30000), "beam_width must be at most 25128"),
])
def test_bad_values(llm, kwargs, message):
    with pytest.raises(ValueError, match=message):
        llm.beam_search("Hello", **kwargs)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_needs_an_idle_engine(llm):
    from fastgpt2 import SamplingParams

    rid = llm.engine.add_request("Hello", SamplingParams(max_tokens=3))
    try:
        with pytest.raises(ValueError, match="idle engine"):
            llm.beam_search("Hello")
    finally:
        llm.engine.abort(rid)
    assert llm.beam_search("Hello", max_tokens=3)[0].finished


def test_cli_prints_the_best_beams_with_scores(llm, eos_dir):
    args = ["generate", "--model", str(eos_dir), "--prompt", "The sky", "--beam-width", "4", "--nsamples", "2",
            "--max-tokens", "12", "--ignore-eos"]
    r = subprocess.run([sys.executable, "-m", "fastgpt2", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    beams = llm.beam_search("The sky", beam_width=4, max_tokens=12, ignore_eos=True, n=2)[0].outputs
    for i, beam in enumerate(beams, 1):
        rule = f"BEAM {i} (score {beam.score:.4f}, logprob {beam.cumulative_logprob:.4f})"
        assert f"{rule} {'=' * 40}\n{beam.text}\n" in r.stdout
    assert "BEAM 3" not in r.stdout
    bad = subprocess.run([sys.executable, "-m", "fastgpt2", *args[:6], "3", "--nsamples", "4"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "fastgpt2: error: --nsamples (4) must be at most --beam-width (3): beam search prints the best --nsamples of "
        "its beams"]
