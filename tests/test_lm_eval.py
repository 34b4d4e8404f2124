"""The lm-evaluation-harness backend, offline: on local tasks written here (multiple choice, loglikelihood,
loglikelihood_rolling) fastgpt2's results equal lm-eval's own `hf` backend on the same random-weight checkpoint, and
generate_until equals greedy transformers cut at the stop strings."""
import json
import random
import re
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's hf backend, the reference

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from fastgpt2 import LLM  # noqa: E402
from fastgpt2.cli import main  # noqa: E402
from fastgpt2.eval.lm_eval_backend import FastGPT2LM  # noqa: E402
from fastgpt2.model.tokenizer import Tokenizer  # noqa: E402
from tests.conftest import TINY_CONFIGS, make_hf_model  # noqa: E402

N = TINY_CONFIGS["tiny"].n_positions
RTOL = 1e-4
WORDS = "the a river stone light north wind sang over under quietly glass house 1907 café".split()
TASKS = ("tiny_mc", "tiny_ll", "tiny_roll")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm-eval-tiny")
    make_hf_model(TINY_CONFIGS["tiny"], seed=11, margin=4.0).save_pretrained(d)
    Tokenizer.from_pretrained().save_pretrained(d)  # lm-eval's hf backend loads the tokenizer from the directory
    return d


def _words(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _task(directory: Path, name: str, body: str, rows: list[dict]) -> None:
    (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {directory / name}.jsonl\n"
        f"test_split: test\n{body}")


def _greedy_word(tiny_dir, context: str) -> str:
    """The model's greedy next token as text, so that some loglikelihood targets are greedy."""
    from transformers import GPT2LMHeadModel

    tokenizer = Tokenizer.from_pretrained(tiny_dir)
    with torch.no_grad():
        logits = GPT2LMHeadModel.from_pretrained(tiny_dir).eval()(torch.tensor([tokenizer.encode(context)])).logits
    return tokenizer.decode([int(logits[0, -1].argmax())])


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, tiny_dir):
    d = tmp_path_factory.mktemp("lm-eval-tasks")
    rng = random.Random(0)
    contexts = [_words(rng, rng.randint(2, 60)) for _ in range(10)]
    _task(d, "tiny_mc", 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_target: label\n'
                        'doc_to_choice: choices\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n',
          [{"question": _words(rng, rng.randint(3, 40)) + "?", "choices": [" " + _words(rng, k) for k in (1, 2, 3, 1)],
            "label": i % 4} for i in range(12)])
    _task(d, "tiny_ll", 'output_type: loglikelihood\ndoc_to_text: "{{context}}"\ndoc_to_target: "{{target}}"\n'
                        'metric_list:\n  - metric: perplexity\n  - metric: acc\n',
          [{"context": c, "target": _greedy_word(tiny_dir, c) if i % 2 else " " + rng.choice(WORDS)}
           for i, c in enumerate(contexts)]
          + [{"context": _words(rng, 300), "target": " " + _words(rng, 3)}])  # truncated to the last N tokens
    _task(d, "tiny_roll", 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                          'metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n'
                          '  - metric: bits_per_byte\n',
          [{"text": _words(rng, n)} for n in (700, 5, 150, 260)])  # 700 words: more than three windows
    return d


def _evaluate(model, model_args, task_dir):
    results = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(TASKS), device="cpu",
                                      task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                                      batch_size=4, log_samples=False)
    return results["results"]


def test_results_equal_lm_evals_hf_backend(tiny_dir, task_dir):
    # The engine's windows hold n_positions - 1 model inputs: the hf backend runs with that max_length.
    want = _evaluate("hf", f"pretrained={tiny_dir},dtype=float32,max_length={N - 1}", task_dir)
    got = _evaluate(FastGPT2LM(pretrained=str(tiny_dir), dtype="float32", device="cpu"), None, task_dir)
    for name in ("acc,none", "acc_norm,none"):
        assert got["tiny_mc"][name] == want["tiny_mc"][name]
    assert got["tiny_ll"]["acc,none"] == want["tiny_ll"]["acc,none"]
    assert got["tiny_ll"]["perplexity,none"] == pytest.approx(want["tiny_ll"]["perplexity,none"], rel=RTOL)
    for name in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert got["tiny_roll"][name] == pytest.approx(want["tiny_roll"][name], rel=RTOL)


def test_generate_until_equals_greedy_transformers(tiny_dir):
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(tiny_dir).eval()
    lm = FastGPT2LM(pretrained=LLM(str(tiny_dir), device="cpu"), max_gen_toks=24)
    rng = random.Random(1)
    contexts = [_words(rng, n) for n in (1, 7, 30, 120)]
    requests, want, full = [], [], []
    for i, context in enumerate(contexts):
        ids = lm.tok_encode(context)
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=24, do_sample=False, pad_token_id=50256)
        text = lm.tok_decode(out[0, len(ids):].tolist())
        full.append(text)
        until = [text[len(text) // 2:len(text) // 2 + 3], "\u2603"] if i % 2 == 0 else []  # a stop string it meets
        requests.append(Instance("generate_until", {}, (context, {"until": until, "do_sample": False}), i))
        want.append(text.split(until[0])[0] if until else text.split("<|endoftext|>")[0])
    assert lm.generate_until(requests, disable_tqdm=True) == want
    assert sum(w != t for w, t in zip(want, full)) >= 2  # the stop strings did cut


class _LocalTasks(TaskManager):
    """lm-eval's command line indexes its thousands of built-in tasks first; these tests need only their own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "include_defaults": False})


def test_entry_point_and_command_line(tiny_dir, task_dir, capsys, monkeypatch):
    setup = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    (target,) = re.findall(r'"lm_eval\.models": \["fastgpt2=([\w.:]+)"\]', setup)
    assert EntryPoint("fastgpt2", target, "lm_eval.models").load() is FastGPT2LM
    assert lm_eval.api.registry.get_model("fastgpt2") is FastGPT2LM
    assert lm_eval.api.registry.get_model("hf").__name__ == "HFLM"  # registering fastgpt2 hides no built-in
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", _LocalTasks)
    code = main(["lm-eval", "run", "--model", "fastgpt2", "--model_args", f"pretrained={tiny_dir},dtype=float32",
                 "--tasks", "tiny_mc", "--include_path", str(task_dir), "--device", "cpu"])
    assert code == 0
    assert re.search(r"\|tiny_mc\s*\|", capsys.readouterr().out)
