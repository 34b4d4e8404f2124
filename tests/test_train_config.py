"""TrainConfig validation, the batch plan, the learning-rate schedule, and `fastgpt2 finetune` refusing bad input
with one line before any worker starts."""
import re

import pytest
import torch

from fastgpt2.cli import main
from fastgpt2.model import GPT2, GPT2Config
from fastgpt2.train import TrainConfig
from fastgpt2.train.launch import torchrun_command
from fastgpt2.train.optim import lr_at


@pytest.mark.parametrize("field, value, message", [
    ("micro_batch_size", 0, "micro_batch_size must be a positive integer"),
    ("max_steps", -1, "max_steps must be a positive integer or None"),
    ("lr", 0.0, "lr must be a number in \\(0.0, inf\\)"),
    ("beta2", 1.0, "beta2 must be a number in \\[0.0, 1.0\\)"),
    ("dropout", 1.0, "dropout must be a number"),
    ("dtype", "float16", "dtype must be one of auto, float32, bfloat16"),
    ("node_rank", 1, "node_rank must be in \\[0, nnodes - 1\\]"),
    ("train", "", "train must be a non-empty string"),
])
def test_config_errors_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=f"TrainConfig.{message}"):
        TrainConfig(**{"train": "t.txt", field: value})


def test_batch_plan():
    cfg = TrainConfig(train="t.txt", micro_batch_size=4, global_batch_tokens=4096)
    assert cfg.batch_plan(world_size=2, n_positions=256) == (256, 16, 2)  # 16 sequences, 2 micro-batches per rank
    assert TrainConfig(train="t.txt", micro_batch_size=4).batch_plan(2, 64) == (64, 8, 1)
    with pytest.raises(ValueError, match="multiple of seq_len x micro_batch_size x world size = 256 x 4 x 3"):
        cfg.batch_plan(world_size=3, n_positions=256)
    with pytest.raises(ValueError, match="seq_len \\(512\\) exceeds the model's context of 256"):
        cfg.replace(seq_len=512).batch_plan(1, 256)


def test_lr_schedule_warms_up_then_decays_by_cosine_to_a_tenth():
    cfg = TrainConfig(train="t.txt", lr=1e-3, warmup_steps=10)
    lrs = [lr_at(s, cfg, 110) for s in range(111)]
    assert lrs[0] == pytest.approx(1e-3 / 11) and lrs[9] == pytest.approx(1e-3 * 10 / 11)
    assert lrs[10] == pytest.approx(1e-3) and lrs[60] == pytest.approx(5.5e-4) and lrs[110] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert TrainConfig(train="t.txt").warmup_for(500) == 50 and TrainConfig(train="t.txt").warmup_for(10**6) == 2000


def test_config_round_trips_through_json(tmp_path):
    cfg = TrainConfig(train="t.txt", lr=3e-5, max_steps=7, activation_checkpointing=True)
    cfg.save(tmp_path / "config.json")
    assert TrainConfig.load(tmp_path / "config.json") == cfg
    with pytest.raises(ValueError, match="unknown training setting 'learning_rate'"):
        TrainConfig.from_dict({"train": "t.txt", "learning_rate": 1.0})


def test_torchrun_command_passes_the_launch_flags_through():
    one = torchrun_command(TrainConfig(train="t", nproc_per_node=8), ["-m", "x"])
    assert one[1:] == ["-m", "torch.distributed.run", "--nproc-per-node=8", "--standalone", "--nnodes=1", "-m", "x"]
    two = torchrun_command(TrainConfig(train="t", nproc_per_node=8, nnodes=2, node_rank=1,
                                       rdzv_endpoint="node0:29500"), ["-m", "x"])
    assert two[3:7] == ["--nproc-per-node=8", "--nnodes=2", "--node-rank=1", "--rdzv-endpoint=node0:29500"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    GPT2(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=32)).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("case, message", [
    ("missing", "train data .*missing.txt does not exist"),
    ("empty", "holds no documents"),
    ("odd", "has 5 bytes, an odd count"),
    ("seq_len", "seq_len \\(64\\) exceeds the model's context of 32 tokens"),
    ("world", "global_batch_tokens \\(96\\) must be a multiple of .* = 32 x 1 x 2 = 64"),
])
def test_cli_refuses_bad_input_before_any_worker_starts(case, message, tmp_path, tiny_dir, capsys):
    (tmp_path / "ok.txt").write_text("Some text.\n" * 20)
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "odd.bin").write_bytes(b"12345")
    train = {"missing": "missing.txt", "empty": "empty.txt", "odd": "odd.bin"}.get(case, "ok.txt")
    args = ["finetune", "--model", str(tiny_dir), "--train", str(tmp_path / train), "--output-dir",
            str(tmp_path / "out"), "--micro-batch-size", "1", "--nproc-per-node", "2"]
    args += {"seq_len": ["--seq-len", "64"], "world": ["--global-batch-tokens", "96"]}.get(case, [])
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastgpt2: error: ")
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "out").exists()  # nothing was started or written

