"""Fine-tuning end to end on CPU with gloo: a 2-process FSDP2 run under torchrun (started by `fastgpt2 finetune
--nproc-per-node 2`) on a tiny GPT-2 and a generated English text lowers the validation loss; its first losses equal
a 1-process run's; SIGKILLed after a checkpoint and resumed it continues with the uninterrupted run's losses; its
export loads in LLM and transformers with the same logits."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastgpt2.model import GPT2, GPT2Config

STEPS, EVERY = 16, 6
_SUBJECTS = ["the cat", "a dog", "my friend", "the old man", "a small bird", "the teacher", "her brother"]
_VERBS = ["sees", "likes", "walks to", "reads about", "finds", "paints", "remembers"]
_OBJECTS = ["the river", "a red house", "the green park", "an old book", "the city", "a tall tree", "the sea"]


def english_text(num_lines: int, seed: int) -> str:
    """Lines of three simple sentences each: a small English text with structure a tiny model learns in steps."""
    rng = random.Random(seed)

    def sentence():
        return f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."

    return "\n".join(" ".join(sentence() for _ in range(3)) for _ in range(num_lines)) + "\n"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    (root / "train.txt").write_text(english_text(300, seed=1))
    (root / "dev.txt").write_text(english_text(30, seed=2))
    torch.manual_seed(0)
    GPT2(GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=64)).save_pretrained(root / "tiny")
    return root


def _args(ws: Path, out: str, valid: bool = True) -> list[str]:
    return ["--model", str(ws / "tiny"), "--train", str(ws / "train.txt"),
            *(["--valid", str(ws / "dev.txt")] if valid else []), "--output-dir", str(ws / out),
            "--max-steps", str(STEPS), "--seq-len", "32", "--micro-batch-size", "2",
            "--global-batch-tokens", "128", "--lr", "3e-3", "--warmup-steps", "2", "--eval-every", str(EVERY),
            "--save-every", str(EVERY), "--no-progress"]


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "fastgpt2", "finetune", *args]


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


@pytest.fixture(scope="module")
def reference_run(workspace):
    """The uninterrupted 2-process run."""
    subprocess.run(_cli(_args(workspace, "ref") + ["--nproc-per-node", "2"]), check=True, timeout=300)
    return workspace / "ref"


def test_two_process_run_lowers_validation_loss(reference_run):
    records = [json.loads(line) for line in (reference_run / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    assert sorted(val) == [0, 6, 12, 16]
    assert val[16] < val[0] - 2.5, val  # 10.8 nats at random init; the text's structure is learned within steps
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in steps)
    assert all(abs(r["val_ppl"] - torch.tensor(r["val_loss"]).exp().item()) < 1e-3 * r["val_ppl"]
               for r in records if "val_loss" in r)
    summary = json.loads((reference_run / "summary.json").read_text())
    assert summary["best_step"] == 16 and summary["best_val_loss"] == val[16]
    assert json.loads((reference_run / "config.json").read_text())["nproc_per_node"] == 2
    assert sorted(p.name for p in (reference_run / "checkpoints").iterdir()) == ["step_00000012", "step_00000016"]
    pytest.importorskip("matplotlib")
    assert (reference_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_two_processes_equal_one_process(reference_run, workspace):
    """Same global batch and seed: 2 ranks with one micro-batch each compute the same steps as 1 rank accumulating two
    micro-batches (the token-weighted loss over the global batch makes the split irrelevant)."""
    from fastgpt2.cli.finetune import build_config
    from fastgpt2.cli import build_parser
    from fastgpt2.train import finetune

    args = build_parser().parse_args(["finetune", *_args(workspace, "one", valid=False), "--save-every", "0"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's workers: on a shared 2-core machine a second thread mostly waits
    try:
        finetune(build_config(args))
    finally:
        torch.set_num_threads(threads)
    one, two = _losses(workspace / "one"), _losses(reference_run)
    for step in range(1, 6):
        assert one[step] == pytest.approx(two[step], rel=1e-5, abs=1e-5), step


def test_resume_after_sigkill_equals_uninterrupted_run(reference_run, workspace):
    out = workspace / "killed"
    args = _args(workspace, "killed") + ["--nproc-per-node", "2"]
    proc = subprocess.Popen(_cli(args), start_new_session=True)
    marker = out / "checkpoints" / f"step_{EVERY:08d}" / "trainer_state.json"
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # launcher and workers at once, with no chance to clean up
    proc.wait()
    assert not (out / "final").exists(), "the run finished before it was killed"
    subprocess.run(_cli(args + ["--resume"]), check=True, timeout=300)
    resumed, reference = _losses(out), _losses(reference_run)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert [resumed[s] for s in range(EVERY + 1, STEPS + 1)] == [reference[s] for s in range(EVERY + 1, STEPS + 1)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary == {**json.loads((reference_run / "summary.json").read_text()), "final_dir": str(out / "final")}


def test_export_loads_in_llm_and_transformers(reference_run, workspace):
    transformers = pytest.importorskip("transformers")
    from fastgpt2 import LLM, SamplingParams

    final = reference_run / "final"
    ids = torch.tensor([[464, 3797, 7224, 262, 1748, 13, 317, 3290]])  # "The cat sees the city. A dog"
    hf = transformers.GPT2LMHeadModel.from_pretrained(final).eval()
    llm = LLM(str(final), device="cpu", dtype="float32")
    with torch.no_grad():
        expected = hf(ids).logits
        torch.testing.assert_close(llm.model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(GPT2.from_pretrained(final, device="cpu")(input_ids=ids).logits, expected,
                                   rtol=1e-5, atol=1e-5)
        initial = GPT2.from_pretrained(workspace / "tiny", device="cpu")(input_ids=ids).logits
    assert (initial - expected).abs().max() > 1.0  # the export holds the fine-tuned weights, not the initial ones
    greedy = llm.generate(ids[0].tolist(), SamplingParams(max_tokens=4, temperature=0))[0].outputs[0].token_ids
    hf_greedy = hf.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=50256)[0, ids.shape[1]:].tolist()
    assert greedy[:len(hf_greedy)] == hf_greedy
