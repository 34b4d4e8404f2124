"""llm.perplexity and `fastgpt2 perplexity`: Hugging Face's sliding-window perplexity (and lm-eval's rolling windows
with prepend_eos) equal a direct computation with transformers on the same random weights, for a text longer than
three windows and strides of the whole context, half and a quarter of it; each token is scored exactly once."""
import json
import math
import random

import pytest
import torch
from transformers import GPT2LMHeadModel

from fastgpt2 import LLM
from fastgpt2.cli import main
from fastgpt2.engine.perplexity import rolling_windows, sliding_windows
from fastgpt2.eval.corpus import read_documents
from tests.conftest import TINY_CONFIGS, make_hf_model

N = TINY_CONFIGS["tiny"].n_positions  # 256: windows of 256 tokens, strides up to 255
RTOL = 1e-4  # float32 logits; the engine batches windows into GEMMs of other shapes than transformers'
WORDS = "the of and river über café light stone north wind 1907 sang quietly, measured. again; glass".split()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("perplexity-tiny")
    make_hf_model(TINY_CONFIGS["tiny"], seed=7, margin=4.0).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def hf(tiny_dir):
    return GPT2LMHeadModel.from_pretrained(tiny_dir).eval()


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return LLM(str(tiny_dir), device="cpu")


def _text(num_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


def _hf_sliding_nll(hf, ids, stride) -> tuple[float, int]:
    """Hugging Face's "perplexity of fixed-length models" loop with max_length = n_positions, counting the tokens the
    shifted labels really score in each window."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + N, len(ids))
        input_ids = torch.tensor([ids[begin:end]])
        target = input_ids.clone()
        target[:, :-(end - prev_end)] = -100
        with torch.no_grad():
            loss = hf(input_ids, labels=target).loss
        scored = int((target[:, 1:] != -100).sum())
        nll, count = nll + loss.item() * scored, count + scored
        prev_end = end
        if end == len(ids):
            break
    return nll, count


def _hf_rolling_nll(hf, ids, stride) -> tuple[float, int]:
    """lm-eval's loglikelihood_rolling windows (<|endoftext|> first, max_seq_len n_positions - 1), via transformers."""
    utils = pytest.importorskip("lm_eval.utils")
    nll, count = 0.0, 0
    windows = utils.get_rolling_token_windows(ids, prefix_token=50256, max_seq_len=N - 1, context_len=N - stride)
    for context, pred in map(utils.make_disjoint_window, windows):
        with torch.no_grad():
            logits = hf(torch.tensor([(context + pred)[:-1]])).logits[0, -len(pred):]
        nll -= torch.log_softmax(logits.double(), -1).gather(1, torch.tensor(pred)[:, None]).sum().item()
        count += len(pred)
    return nll, count


@pytest.mark.parametrize("stride, prepend_eos", [(N - 1, False), (N // 2, False), (N // 4, False), (N - 1, True),
                                                 (N // 4, True)])
def test_perplexity_matches_transformers(llm, hf, stride, prepend_eos):
    text = _text(600, seed=stride)
    ids = llm.tokenizer.encode(text)
    assert len(ids) > 3 * N
    got = llm.perplexity(text, stride=stride, prepend_eos=prepend_eos, use_tqdm=False)
    nll, count = (_hf_rolling_nll if prepend_eos else _hf_sliding_nll)(hf, ids, stride)
    assert got.num_tokens == count == len(ids) - (0 if prepend_eos else 1)
    assert got.num_bytes == len(text.encode("utf-8")) > len(text)  # 'über', 'café'
    assert got.perplexity == pytest.approx(math.exp(nll / count), rel=RTOL)
    assert got.mean_nll == pytest.approx(nll / count, rel=RTOL)
    assert got.bits_per_byte == pytest.approx(nll / (got.num_bytes * math.log(2)), rel=RTOL)
    assert got.perplexity == pytest.approx(math.exp(got.mean_nll), rel=1e-12)


@pytest.mark.parametrize("num_tokens", [0, 1, 2, 3, 100, N - 1, N, N + 1, 3 * N + 77])
@pytest.mark.parametrize("stride", [1, 37, N // 2, N - 1])
def test_windows_score_every_token_once(num_tokens, stride):
    for make, first_scored in ((sliding_windows, 1), (rolling_windows, 1)):
        windows = make(num_tokens, N, stride)
        scored = [t for _, end, first in windows for t in range(first, end)]
        assert scored == list(range(first_scored, num_tokens))
        for k, (begin, end, first) in enumerate(windows):
            assert 0 <= begin < first < end <= begin + N
            assert k == 0 or first - begin >= N - stride  # later windows keep at least N - stride tokens of context


@pytest.mark.parametrize("num_tokens", [1, 2, 200, N - 1, N, N + 1, 1000])
@pytest.mark.parametrize("stride", [1, 100, N - 1])
def test_rolling_windows_are_lm_evals(num_tokens, stride):
    utils = pytest.importorskip("lm_eval.utils")
    tokens = list(range(1, num_tokens))  # ids equal positions in [<|endoftext|>] + tokens, the prefix being 0
    want = [(context[0], pred[-1] + 1, pred[0]) for context, pred in map(utils.make_disjoint_window, (
        (a, b) for a, b in utils.get_rolling_token_windows(tokens, 0, max_seq_len=N - 1, context_len=N - stride)))]
    assert rolling_windows(num_tokens, N, stride) == want


def test_documents_pool_over_tokens_and_ids_equal_text(llm):
    docs = [_text(200, seed=1), _text(20, seed=2), "x"]
    each = [llm.perplexity(d, stride=100, use_tqdm=False) for d in docs[:2]]
    pooled = llm.perplexity(docs, stride=100, use_tqdm=False)
    nll = sum(r.mean_nll * r.num_tokens for r in each)
    assert pooled.num_tokens == sum(r.num_tokens for r in each)  # 'x' is one token: context only
    assert pooled.mean_nll == pytest.approx(nll / pooled.num_tokens, rel=1e-6)  # not a mean of perplexities
    assert pooled.num_bytes == sum(len(d.encode()) for d in docs)
    ids = llm.tokenizer.encode(docs[0])
    by_ids = llm.perplexity(torch.tensor(ids), stride=100, use_tqdm=False)
    assert (by_ids.num_tokens, by_ids.num_bytes) == (each[0].num_tokens, each[0].num_bytes)
    assert by_ids.mean_nll == pytest.approx(each[0].mean_nll, rel=1e-6)
    assert llm.perplexity([ids, docs[1]], stride=100, prepend_eos=True, use_tqdm=False).num_tokens == \
        len(ids) + len(llm.tokenizer.encode(docs[1]))


def test_batching_chunking_and_prefix_cache_change_nothing(tiny_dir, llm):
    text = _text(250, seed=9)
    first = llm.perplexity(text, stride=64, use_tqdm=False)
    again = llm.perplexity(text, stride=64, use_tqdm=False)  # context blocks may now come from the prefix cache
    chunked = LLM(str(tiny_dir), device="cpu", max_num_batched_tokens=96, enable_prefix_caching=False,
                  max_num_seqs=3).perplexity(text, stride=64, use_tqdm=False)
    for other in (again, chunked):
        assert other.num_tokens == first.num_tokens
        assert other.mean_nll == pytest.approx(first.mean_nll, rel=1e-6)


def test_bad_input_is_refused(llm):
    for stride in (0, N, True, 2.5):
        with pytest.raises(ValueError, match=r"stride must be an integer in \[1, 255\]"):
            llm.perplexity("some words here", stride=stride, use_tqdm=False)
    with pytest.raises(ValueError, match="nothing to score"):
        llm.perplexity("x", stride=8, use_tqdm=False)
    assert llm.perplexity("x", stride=8, prepend_eos=True, use_tqdm=False).num_tokens == 1
    for prepend_eos in (False, True):  # an empty text is refused as such, whatever prepend_eos says
        with pytest.raises(ValueError, match="the text is empty"):
            llm.perplexity("", stride=8, prepend_eos=prepend_eos, use_tqdm=False)
    with pytest.raises(ValueError, match="token id 60000"):
        llm.perplexity([1, 2, 60000], stride=8, use_tqdm=False)
    with pytest.raises(TypeError):
        llm.perplexity(3.5, stride=8, use_tqdm=False)


def test_read_documents(tmp_path):
    (tmp_path / "a.txt").write_text("first document\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text('{"text": "second"}\n\n{"text": "third", "id": 3}\n')
    (tmp_path / ".hidden").write_text("never read")
    assert read_documents(tmp_path) == ["first document\n", "second", "third"]
    assert read_documents(tmp_path / "a.txt") == ["first document\n"]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 has no string `text` field"):
        read_documents(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError):
        read_documents(tmp_path / "missing")


def test_cli_prints_the_result(tiny_dir, llm, tmp_path, capsys):
    docs = [_text(200, seed=3), _text(50, seed=4)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    assert main(["perplexity", "--model", str(tiny_dir), "--data", str(tmp_path / "data.jsonl"), "--stride", "128",
                 "--prepend-eos", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = llm.perplexity(docs, stride=128, prepend_eos=True, use_tqdm=False)
    assert got["num_tokens"] == want.num_tokens and got["num_bytes"] == want.num_bytes
    for field in ("perplexity", "mean_nll", "bits_per_byte"):
        assert got[field] == pytest.approx(getattr(want, field), rel=1e-6)
    assert main(["perplexity", "--model", str(tiny_dir), "--data", str(tmp_path / "data.jsonl"), "--stride",
                 "64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["perplexity", "mean_nll", "num_tokens", "num_bytes",
                                                       "bits_per_byte"]
    assert main(["perplexity", "--model", str(tiny_dir), "--data", str(tmp_path / "data.jsonl")]) == 2  # stride 512
    assert "stride must be an integer in [1, 255]" in capsys.readouterr().err


def test_bench_case_runs_and_agrees(llm, hf):
    from fastgpt2.benchmarks import cpu_cases, cpu_report, perplexity_case

    systems = cpu_cases.Systems(llm, hf, None, random.Random(0))
    result = perplexity_case.perplexity(systems, num_tokens=300, stride=128, repeats=1)
    assert result["num_windows"] == 2 and result["warmup_perplexity_rel_diff"] < RTOL
    assert all(r["tokens_per_s"] > 0 for r in result["systems"].values())
    (row,) = cpu_report._rows({"perplexity": result})
    assert row[0] == "perplexity, 300-token text, windows of 256, stride 128" and row[-1] > 0
